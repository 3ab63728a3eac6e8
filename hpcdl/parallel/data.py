"""Data parallel: every rank holds the whole model; gradients are summed over ranks by the one
gradient-sync engine (grad_sync.py), each bucket started by a hook during backward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.device import to_cpu
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.grad_sync import GradSync
from hpcdl.parallel.strategy import StepResult, Strategy, forward_backward, named_params


def broadcast_module(world: World, module: nn.Module, root: int = 0) -> None:
    """Make every rank's parameters and buffers bitwise equal to `root`'s."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            world.broadcast_(tensor.data, root)


def broadcast_optimizer(world: World, optimizer: torch.optim.Optimizer, root: int = 0) -> None:
    """Make every rank's optimizer state (moments, step counts, hyper-parameters) equal to `root`'s."""
    state = world.bcast(to_cpu(optimizer.state_dict()) if world.rank == root else None, root)
    if world.rank != root:
        optimizer.load_state_dict(state)


class DataParallelStrategy(Strategy):
    """A model replicated on every rank of `world`, with bucketed, overlapped gradient Allreduce.

    Each rank's loss is its share of the global batch's mean (see `share_of_loss`),
    so the sum over ranks is the mean gradient: the averaging costs nothing. Pipeline
    stages and tensor shards use it for their replicas' gradient sum.
    """

    replicated = True

    def __init__(
        self,
        model: nn.Module,
        world: World,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        compression: str = "none",
    ):
        self.model, self.world = model, world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device if self.params else self.device  # a user's model.cuda() (hpcdl.api)
        self.param_names = named_params(model, self.params)
        self.share = DataShare(world.rank, world.size)
        broadcast_module(world, model)
        self.grads = GradSync(world, self.params, int(bucket_mb * 2**20), compression, overlap=overlap)

    def summary(self) -> dict:
        """How the gradients were summed: buckets, overlap with backward, their type on the wire."""
        grads = self.grads
        wire = sorted({str(b.wire.dtype).removeprefix("torch.") for b in grads.buckets})
        return {"grad_sync": {"buckets": len(grads.buckets), "overlap": grads.overlap, "wire": wire}}

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally: backward inside this block communicates nothing."""
        with self.grads.no_sync():
            yield

    def forward_backward(self, batch: Batch, timer: PhaseTimer, scale: float = 1.0) -> StepResult:
        """Forward and backward on this rank's share; buckets start their Allreduce as they fill."""
        return forward_backward(self, self.model, batch, timer, scale)

    def finish_sync(self, timer: PhaseTimer) -> None:
        """Wait for every bucket's sum (the exposed communication), starting any not yet started."""
        with timer.phase("comm"):
            self.grads.finish()

    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """One micro-step; with `sync` False the gradients only accumulate locally."""
        if not sync:
            with self.no_sync():
                return self.forward_backward(batch, timer, scale)
        result = self.forward_backward(batch, timer, scale)
        self.finish_sync(timer)
        return result

    def evaluate_batch(self, batch: Batch) -> StepResult:
        """The figures of this rank's share, without learning."""
        self.model.eval()
        with self.autocast():
            return self.objective.evaluate_batch(self.model, batch)

    def zero_grad(self) -> None:
        """Zero the gradient buckets for the next step (no allocation)."""
        self.grads.zero()

    @property
    def bytes_per_sync(self) -> int:
        """Bytes of gradients this rank reduces per optimizer step (for the scaling study)."""
        return self.grads.bytes_per_sync

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replicas start from rank 0's optimizer state (also after a resume)."""
        broadcast_optimizer(self.world, optimizer)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state: every rank holds all of it."""
        return self.model.state_dict()
