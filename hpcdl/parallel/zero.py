"""Sharded data parallel (ZeRO stages 1 and 2, Rajbhandari et al. 2020): every rank holds the whole model for
forward and backward, but the optimizer state only for its own contiguous 1/N slice of the flat parameter
space, and updates only that slice; the slices are then re-assembled on every rank with one Allgather.

The parameters live in one flat buffer (padded to a multiple of N), each parameter a view into it, and the
gradients likewise; rank r's slice is a view too, so the optimizer's step writes straight into the model
and the Allgather fills the others' slices in place.

Stage 1 sums the whole gradient with Allreduce (every rank holds it) and steps on its slice of it. Stage 2
sums with Reduce_scatter: a rank receives the summed gradient of its slice only, bucket by bucket as backward
makes them (consecutive parameters in reverse order, `bucket_mb` each, cut as the data-parallel engine cuts
them; a bucket's region can span several ranks' slices: Reduce_scatter with uneven counts). Either way a
step moves about what data parallel's Allreduce moves (Reduce_scatter + Allgather = Allreduce), while the
optimizer state per rank falls as 1/N.

Checkpoints hold the whole model and the whole optimizer state keyed as data parallel's (the slices joined on
rank 0, cut again on load), so a ZeRO run resumes as data parallel and back, at any number of ranks.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass

import torch
from torch import nn

from hpcdl.comm import Request, World, waitall
from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.data import broadcast_module
from hpcdl.parallel.grad_sync import group_parameters
from hpcdl.parallel.strategy import StepResult, Strategy, forward_backward


@dataclass
class SliceBucket:
    """Consecutive parameters whose summed gradients travel in one Reduce_scatter, as soon as all are final."""

    params: list[nn.Parameter]
    begin: int  # their region [begin, end) of the flat space
    end: int
    counts: list[int]  # how much of the region each rank's slice holds
    received: torch.Tensor  # this rank's part: a view into its slice's summed gradient
    ready: int = 0
    request: Request | None = None

    @property
    def complete(self) -> bool:
        return self.ready == len(self.params)


class ZeroDataParallel(Strategy):
    """Data parallel whose optimizer state (stage 1) and summed gradients (stage 2) are split over the ranks."""

    def __init__(self, model: nn.Module, world: World, stage: int = 2, bucket_mb: float = 25.0):
        self.model, self.world, self.stage = model, world, stage
        self.whole = [p for p in model.parameters() if p.requires_grad]
        self.share = DataShare(world.rank, world.size)
        broadcast_module(world, model)
        dtype = self.whole[0].dtype
        self.numel = sum(p.numel() for p in self.whole)
        self.slice_len = math.ceil(self.numel / world.size)
        padded = self.slice_len * world.size
        self.flat = torch.zeros(padded, dtype=dtype)
        self.flat_grads = torch.zeros(padded, dtype=dtype)
        self.offsets, offset = [], 0
        with torch.no_grad():
            for p in self.whole:  # each parameter and its gradient become views into the flat buffers
                self.flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.flat[offset : offset + p.numel()].view_as(p)
                p.grad = self.flat_grads[offset : offset + p.numel()].view_as(p)
                self.offsets.append(offset)
                offset += p.numel()
        self.start = world.rank * self.slice_len
        own = slice(self.start, self.start + self.slice_len)
        self.shard = nn.Parameter(self.flat[own])  # shares the flat buffer: the step updates the model
        self.shard.grad = self.flat_grads[own] if stage == 1 else torch.zeros(self.slice_len, dtype=dtype)
        self.params, self.param_names = [self.shard], [f"parameters {own.start}..{own.stop - 1} of {self.numel}"]
        self.split_group = world
        self.optimizer_bytes = 0  # this rank's optimizer state, counted after each step
        self.index = {id(p): i for i, p in enumerate(self.whole)}
        self.buckets = [self._bucket(group) for group in group_parameters(self.whole, int(bucket_mb * 2**20))]
        self.bucket_of = {id(p): bucket for bucket in self.buckets for p in bucket.params}
        self.syncing, self.started = False, 0
        if stage == 2:
            for p in self.whole:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _bucket(self, params: list[nn.Parameter]) -> SliceBucket:
        """A group of consecutive parameters: its region of the flat space and each rank's part of it."""
        first, last = min(self.index[id(p)] for p in params), max(self.index[id(p)] for p in params)
        begin, end = self.offsets[first], self.offsets[last] + self.whole[last].numel()
        counts = [
            max(0, min(end, (r + 1) * self.slice_len) - max(begin, r * self.slice_len)) for r in range(self.world.size)
        ]
        mine = max(begin, self.start) - self.start
        return SliceBucket(params, begin, end, counts, self.shard.grad[mine : mine + counts[self.world.rank]])

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        """Stage 2, in a step that syncs: start the buckets whose gradients are all final, in index order."""
        if not self.syncing:
            return
        self._keep_grad_view(param)
        self.bucket_of[id(param)].ready += 1
        while self.started < len(self.buckets) and self.buckets[self.started].complete:
            self._start(self.buckets[self.started])

    def _start(self, bucket: SliceBucket) -> None:
        """Sum one bucket over the ranks, each receiving its part of it (Reduce_scatter with uneven counts)."""
        self.started += 1
        bucket.request = self.world.ireduce_scatter(
            self.flat_grads[bucket.begin : bucket.end], bucket.received, bucket.counts
        )

    # -- the step

    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """Forward and backward of this rank's rows on the whole model; with `sync`, the slice's summed gradient."""
        self.syncing = sync and self.stage == 2  # stage 2: buckets reduce-scatter as backward makes them
        result = forward_backward(self, self.model, batch, timer, scale)
        self.syncing = False
        for p in self.whole:
            self._keep_grad_view(p)
        if sync:
            with timer.phase("comm"):
                if self.stage == 1:
                    self.world.allreduce_(self.flat_grads)
                else:
                    self._finish()
        return result

    def _finish(self) -> None:
        """Start the buckets not started yet (parameters backward did not reach), in order; wait for all."""
        while self.started < len(self.buckets):
            self._start(self.buckets[self.started])
        waitall(b.request for b in self.buckets)
        for bucket in self.buckets:
            bucket.request, bucket.ready = None, 0
        self.started = 0

    def _keep_grad_view(self, p: nn.Parameter) -> None:
        """Autograd accumulates into an existing .grad in place; one it made anew is moved into the flat buffer."""
        offset = self.offsets[self.index[id(p)]]
        view = self.flat_grads[offset : offset + p.numel()]
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad.reshape(-1))
            p.grad = view.view_as(p)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, timer: PhaseTimer) -> None:
        """Step this rank's slice, then every rank's slices gathered into every rank's flat parameters."""
        with timer.phase("optimizer"):
            optimizer.step()
        with timer.phase("comm"):
            self.world.allgather_(self.flat)
        # The loop owns the optimizer: its state is counted here, for the summary.
        self.optimizer_bytes = sum(
            v.numel() * v.element_size() for entry in optimizer.state.values() for v in entry.values() if _sliced(v)
        )

    def evaluate_batch(self, batch: Batch) -> StepResult:
        """The figures of this rank's rows on the whole model."""
        self.model.eval()
        with self.autocast():
            return self.objective.evaluate_batch(self.model, batch)

    def zero_grad(self) -> None:
        """Zero the flat gradients (and stage 2's summed slice) in place."""
        self.flat_grads.zero_()
        self.shard.grad.zero_()

    def split_param_ids(self) -> set[int]:
        """The slice is this rank's part of the whole gradient: norms add over the ranks."""
        return {0}

    def prune_weights(self) -> list[tuple[torch.Tensor, bool]]:
        """Every rank holds the whole model after the Allgather: its weights are counted whole (views into `flat`,
        so zeroing them zeroes the slice the optimizer steps too)."""
        return [(p, False) for p in self.whole if p.dim() >= 2]

    @property
    def bytes_per_sync(self) -> int:
        """Bytes summed and gathered per step: Allreduce + Allgather (stage 1), Reduce_scatter + Allgather (2)."""
        flat = self.flat.numel() * self.flat.element_size()
        return flat * 3 // 2 if self.stage == 1 else flat

    # -- checkpoints: the whole model and the whole optimizer state, keyed as data parallel's

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model: every rank holds it after the Allgather."""
        return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Every rank's slice state joined on rank 0 into per-parameter entries, as data parallel's optimizer has."""
        own = optimizer.state_dict()
        parts = self.world.gather(own["state"].get(0, {}))
        groups = [{**g, "params": list(range(len(self.whole)))} for g in own["param_groups"]]
        if parts is None:
            return {"state": {}, "param_groups": groups}
        state = {}
        if parts[0]:
            joined = {
                key: torch.cat([part[key] for part in parts]) if _sliced(value) else value
                for key, value in parts[0].items()
            }
            for index, (p, offset) in enumerate(zip(self.whole, self.offsets)):
                # A copy each, scalars too: Adam steps each parameter's "step" tensor in place.
                state[index] = {
                    key: value[offset : offset + p.numel()].view_as(p).clone() if _sliced(value) else _copy(value)
                    for key, value in joined.items()
                }
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """This rank's slice cut from a whole optimizer state (saved by data parallel or ZeRO at any ranks)."""
        entries = state.get("state", {})
        own: dict = {}
        if entries:
            first = entries[min(entries)]
            for key, value in first.items():
                if not (torch.is_tensor(value) and value.dim() > 0):
                    own[key] = value
                    continue
                flat = torch.zeros_like(self.flat, dtype=value.dtype)
                for index, (p, offset) in enumerate(zip(self.whole, self.offsets)):
                    if index in entries:
                        flat[offset : offset + p.numel()] = entries[index][key].reshape(-1)
                own[key] = flat[self.start : self.start + self.slice_len].clone()
        groups = [{**g, "params": [0]} for g in state["param_groups"]]
        optimizer.load_state_dict({"state": {0: own} if own else {}, "param_groups": groups})

    def summary(self) -> dict:
        """Per rank: bytes of parameters, gradients and optimizer state held, and peak resident memory."""
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        grads = nbytes(self.flat_grads) + (nbytes(self.shard.grad) if self.stage == 2 else 0)
        mine = {
            "param_bytes": nbytes(self.flat),
            "grad_bytes": grads,
            "optimizer_state_bytes": self.optimizer_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        return {"zero": {"stage": self.stage, "per_rank": self.world.allgather(mine)}}


def _copy(value):
    return value.clone() if torch.is_tensor(value) else value


def _sliced(value) -> bool:
    """A per-element state tensor (momentum, moments), not a scalar such as Adam's step."""
    return torch.is_tensor(value) and value.dim() > 0
