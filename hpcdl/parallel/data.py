"""Data parallel: every rank holds the whole model; gradients are summed over ranks in buckets,
each bucket's Iallreduce started by a hook as soon as backward has produced all of its gradients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hpcdl.comm import World, as_buffer
from hpcdl.data.loader import Batch
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.buckets import GradBuckets
from hpcdl.parallel.common import evaluate_batch, share_of_loss, zero_contribution


def broadcast_module(world: World, module: nn.Module, root: int = 0) -> None:
    """Make every rank's parameters and buffers bitwise equal to `root`'s."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            world.comm.Bcast(as_buffer(tensor.data), root=root)


def broadcast_optimizer(world: World, optimizer: torch.optim.Optimizer, root: int = 0) -> None:
    """Make every rank's optimizer state (moments, step counts, hyper-parameters) equal to `root`'s."""
    state = world.comm.bcast(optimizer.state_dict() if world.rank == root else None, root=root)
    if world.rank != root:
        optimizer.load_state_dict(state)


class DataParallel:
    """A model replicated on every rank, with bucketed, overlapped gradient Allreduce.

    Each rank's loss is its share of the global batch's mean (see `share_of_loss`),
    so the sum over ranks is the mean gradient: the averaging costs nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        world: World,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        compression: str = "none",
    ):
        self.model, self.world, self.overlap = model, world, overlap
        self.params = [p for p in model.parameters() if p.requires_grad]
        broadcast_module(world, model)
        self.grads = GradBuckets(world, self.params, int(bucket_mb * 2**20), compression)
        self.sync_enabled = True
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self.grads.mark_ready(param)
        if not (self.sync_enabled and self.overlap):
            return
        if bucket is not None:
            self.grads.start(bucket)
        self.grads.progress()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally: backward inside this block communicates nothing."""
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = True

    def forward_backward(self, batch: Batch, timer: PhaseTimer, scale: float = 1.0) -> tuple[float, int, int]:
        """Forward and backward on this rank's share; buckets start their Allreduce as they fill."""
        self.model.train()
        with timer.phase("forward"):
            if len(batch.y):
                logits = self.model(batch.x)
                loss = share_of_loss(logits, batch)
                correct = int((logits.detach().argmax(dim=1) == batch.y).sum())
            else:
                loss, correct = zero_contribution(self.model), 0
        with timer.phase("backward"):
            (loss * scale if scale != 1.0 else loss).backward()
        return loss.item() * batch.global_count, correct, len(batch.y)

    def finish_sync(self, timer: PhaseTimer) -> None:
        """Wait for every bucket's sum (the exposed communication), starting any not yet started."""
        with timer.phase("comm"):
            self.grads.start_all_idle()
            self.grads.wait()

    def train_step(
        self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0
    ) -> tuple[float, int, int]:
        """One micro-step; with `sync` False the gradients only accumulate locally."""
        if not sync:
            with self.no_sync():
                return self.forward_backward(batch, timer, scale)
        stats = self.forward_backward(batch, timer, scale)
        self.finish_sync(timer)
        return stats

    def zero_grad(self) -> None:
        """Zero the gradient buckets for the next step (no allocation)."""
        self.grads.zero()

    @property
    def bytes_per_sync(self) -> int:
        """Bytes of gradients this rank reduces per optimizer step (for the scaling study)."""
        return self.grads.bytes_per_sync

    @property
    def data_rank(self) -> int:
        """This rank's share of each global batch."""
        return self.world.rank

    @property
    def data_size(self) -> int:
        """How many ranks split each global batch."""
        return self.world.size

    def evaluate_batch(self, batch: Batch) -> tuple[float, int, int]:
        """(summed loss, correct, samples) of this rank's share, without learning."""
        self.model.eval()
        return evaluate_batch(self.model, batch)

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replicas start from rank 0's optimizer state (also after a resume)."""
        broadcast_optimizer(self.world, optimizer)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state: every rank holds all of it."""
        return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state, the same on every rank."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore the optimizer's state saved by `optimizer_state`."""
        optimizer.load_state_dict(state)
