"""The one gradient-sync engine: gradients in flat buckets grouped by dtype, each summed over ranks by
one non-blocking Allreduce that a hook starts as soon as backward has produced all of the bucket's
gradients. The command line's data parallel, `hpcdl.DataParallel` and
`hpcdl.horovod.DistributedOptimizer` all sum gradients through it.

Each bucket travels in a wire dtype: its own dtype, or the compression's (fp16, bf16). MPI sums
float64, float32 and float16 as they are; it has no bfloat16 arithmetic, so a bfloat16 wire is
summed in float32 (a float32 Allreduce measured 1.5-3x faster than gathering every rank's bfloat16
copy and summing locally, at 2 and 3 ranks).

On a GPU the buckets live on the device and reach MPI through the device's `Transport`: handed over as
they are when MPI is CUDA-aware, else copied to pinned host memory on a side stream. Either way a
bucket's Iallreduce starts once its copy (or the kernels that wrote it) is done, checked at every
later gradient hook, so the copy overlaps the next bucket's backward.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hpcdl import trace
from hpcdl.comm import SUMMABLE, Request, World, testall, transport, waitall

WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Bucket:
    """Gradients of a few parameters of one dtype in one flat buffer; each parameter's .grad is a view into it."""

    params: list[nn.Parameter]
    flat: torch.Tensor
    wire: torch.Tensor  # what MPI sums: `flat` itself, or a copy in the wire's (summable) dtype
    host: torch.Tensor  # what MPI reads and writes: `wire` itself, or its pinned host copy (staged transport)
    rounds_to: torch.dtype | None = None  # bf16 compression: values are rounded to it before the float32 sum
    ready: int = 0  # how many of its gradients are final in this sync
    copied: object = None  # the event after which MPI may read `host` (None: at once)
    request: Request | None = None
    started: float = 0.0  # when its Allreduce began (recorded only while tracing)


def group_parameters(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Parameters in reverse registration order (the order backward produces their gradients), one
    group per dtype at a time, each cut at `bucket_bytes` (a larger parameter gets a group of its own)."""
    groups: list[list[nn.Parameter]] = []
    open_group: dict[torch.dtype, tuple[list[nn.Parameter], int]] = {}
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        group, size = open_group.get(p.dtype, (None, 0))
        if group is None or (group and size + nbytes > bucket_bytes):
            group, size = [], 0
            groups.append(group)
        group.append(p)
        open_group[p.dtype] = (group, size + nbytes)
    return groups


def _wire(flat: torch.Tensor, compression: str) -> tuple[torch.Tensor, torch.dtype | None]:
    """The buffer MPI sums for `flat`, and the dtype its values are rounded through on the way."""
    wanted = WIRE_DTYPES[compression] or flat.dtype
    if wanted in SUMMABLE:
        return (flat if wanted == flat.dtype else torch.zeros_like(flat, dtype=wanted)), None
    # bfloat16 (the model's or the compression's): rounded to it, summed in float32.
    rounded = wanted if wanted != flat.dtype else None
    return (flat if flat.dtype == torch.float32 else torch.zeros_like(flat, dtype=torch.float32)), rounded


class GradSync:
    """A model's gradients as buckets, each summed (and scaled) over the ranks of `world` by one Iallreduce.

    A post-accumulate-grad hook on each parameter keeps its .grad in its bucket (even after
    `zero_grad(set_to_none=True)`), counts `passes` local backward passes, and, when `overlap`
    is on, starts a bucket's sum as soon as its last gradient is final. `finish()` starts the
    rest, waits, and multiplies by `scale` (1/world for an average); `no_sync()` only accumulates.
    """

    def __init__(
        self,
        world: World,
        params: list[nn.Parameter],
        bucket_bytes: int,
        compression: str = "none",
        *,
        overlap: bool = True,
        passes: int = 1,
        scale: float = 1.0,
    ):
        self.world, self.overlap, self.passes, self.scale = world, overlap, passes, scale
        self.via = transport(params[0].device if params else torch.device("cpu"))  # how buckets reach MPI
        self.params = params
        self.sync_enabled = True
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[nn.Parameter, Bucket] = {}
        self.views: dict[nn.Parameter, torch.Tensor] = {}
        for group in group_parameters(params, bucket_bytes):
            flat = torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            wire, rounds_to = _wire(flat, compression)
            bucket = Bucket(group, flat, wire, self.via.mirror(wire), rounds_to)
            offset = 0
            for p in group:
                p.grad = self.views[p] = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                self.bucket_of[p] = bucket
            self.buckets.append(bucket)
        self.countdown = dict.fromkeys(params, passes)
        self.started = 0  # buckets start strictly in index order: the same order of collectives on every rank
        self.copying: deque[Bucket] = deque()  # started, waiting for MPI to be able to read them, in order
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @property
    def bytes_per_sync(self) -> int:
        """Bytes of gradients this rank reduces per sync (in the wire's dtype)."""
        return sum(b.wire.numel() * b.wire.element_size() for b in self.buckets)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        view = self.views[param]
        if param.grad.data_ptr() != view.data_ptr():
            # zero_grad(set_to_none=True) dropped the view; autograd made a new tensor: move it back.
            view.copy_(param.grad)
            param.grad = view
        self.countdown[param] -= 1
        if self.countdown[param] > 0 or not (self.sync_enabled and self.overlap):
            return
        self.bucket_of[param].ready += 1
        # A bucket complete before an earlier one waits for it: ranks whose backward orders gradients
        # differently (a parameter unused on one rank) must still start the same collectives in the same order.
        while self.started < len(self.buckets) and self._complete(self.buckets[self.started]):
            self._start(self.buckets[self.started])
        self._progress()

    @staticmethod
    def _complete(bucket: Bucket) -> bool:
        return bucket.ready == len(bucket.params)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this block only accumulates gradients locally (no communication)."""
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = True

    def _start(self, bucket: Bucket) -> None:
        """Begin summing one bucket over ranks without waiting for it (the next in index order)."""
        self.started += 1
        if trace.ACTIVE is not None:
            bucket.started = time.perf_counter()
        if bucket.rounds_to is not None:  # compressed: rounded to the wire's precision, possibly in place
            bucket.wire.copy_(bucket.flat.to(bucket.rounds_to))
        elif bucket.wire is not bucket.flat:
            bucket.wire.copy_(bucket.flat)
        bucket.copied = self.via.to_host(bucket.wire, bucket.host)
        self.copying.append(bucket)

    def _launch(self, wait: bool = False) -> None:
        """Start the Iallreduce of each started bucket MPI can read now, in order (with `wait`, of all of them)."""
        while self.copying and (wait or self.via.ready(self.copying[0].copied)):
            bucket = self.copying.popleft()
            self.via.wait(bucket.copied)
            bucket.request = self.world.iallreduce(bucket.host)

    def _progress(self) -> None:
        """Start what can start; let MPI move pending sums forward (MPI progresses only inside MPI calls)."""
        self._launch()
        pending = [b.request for b in self.buckets if b.request is not None]
        if pending:
            testall(pending)

    def finish(self) -> None:
        """Start every bucket not started yet, wait for all; afterwards each .grad holds the (scaled) sum."""
        while self.started < len(self.buckets):
            self._start(self.buckets[self.started])
        self._launch(wait=True)
        waitall(b.request for b in self.buckets)
        if trace.ACTIVE is not None:  # one timeline event per bucket: its start to the wait's end
            done = time.perf_counter()
            for k, b in enumerate(self.buckets):
                trace.ACTIVE.record(f"allreduce bucket {k}", b.started, done - b.started, trace.BUCKET_TID + k)
        for bucket in self.buckets:
            bucket.request, bucket.ready, bucket.copied = None, 0, None
            self.via.from_host(bucket.host, bucket.wire)
            if bucket.wire is not bucket.flat:
                bucket.flat.copy_(bucket.wire)
            if self.scale != 1.0:
                bucket.flat.mul_(self.scale)
        self.countdown, self.started = dict.fromkeys(self.params, self.passes), 0

    def zero(self) -> None:
        """Zero all gradients in place (the views stay attached to their buckets).

        Sums already started are completed first: every rank started them, and MPI must see them end.
        """
        self._launch(wait=True)
        pending = [b.request for b in self.buckets if b.request is not None]
        if pending:
            waitall(pending)
        for bucket in self.buckets:
            bucket.flat.zero_()
            bucket.ready, bucket.request, bucket.copied = 0, None, None
        self.countdown, self.started = dict.fromkeys(self.params, self.passes), 0
