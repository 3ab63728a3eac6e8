"""Horovod's reductions: the op names, allreduce in its new-tensor, in-place, async and grouped forms.

A reduction runs on a copy of the input in a dtype MPI can reduce (the compression's, else the
tensor's; bfloat16 in float32, since MPI has no bfloat16 arithmetic), then lands in the target.
The synchronous forms are differentiable: the gradient of an allreduce is the allreduce of the
gradient with the same op and scaling, as Horovod's.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcdl.comm import SUMMABLE, Op
from hpcdl.horovod.agreement import EVERYTHING, agreed
from hpcdl.horovod.autograd import differentiable
from hpcdl.horovod.compression import Compression, Compressor
from hpcdl.horovod.errors import ArgumentError
from hpcdl.horovod.handles import Handle, named, synchronize
from hpcdl.horovod.process_sets import ProcessSet, resolve
from hpcdl.horovod.refused import not_offered

# Reduction ops, as Horovod names them.
Average, Sum, Adasum, Min, Max, Product = "average", "sum", "adasum", "min", "max", "product"


# The reduction each op performs on the wire, as the communication layer and agreement.py name it.
_REDUCTIONS: dict[str, Op] = {Average: "sum", Sum: "sum", Min: "min", Max: "max", Product: "product"}


def wire_op(op: str) -> Op:
    """The reduction a Horovod op performs on the wire (Average sums, then divides); Adasum and unknown ops raise."""
    if op == Adasum:
        not_offered("op=hvd.Adasum", "op=hvd.Average (the default) or op=hvd.Sum")
    if op not in _REDUCTIONS:
        raise ArgumentError(f"hpcdl.horovod: unknown reduction op {op!r}; use hvd.Average, hvd.Sum, hvd.Min or hvd.Max")
    return _REDUCTIONS[op]


def resolve_op(op: str | None, average: bool | None) -> str:
    """The op of a call that may give the deprecated `average=` instead."""
    if op is not None and average is not None:
        raise ArgumentError("hpcdl.horovod: give op= or the deprecated average=, not both")
    if op is None:
        return Sum if average is False else Average
    return op


def _scale(work: torch.Tensor, factor: float, divisor: int) -> None:
    """work *= factor / divisor in place; integer tensors round toward zero, as Horovod's do."""
    if factor == 1 and divisor == 1:
        return
    if work.dtype.is_floating_point:
        work.mul_(factor / divisor)
    else:
        work.copy_(torch.div(work * factor, divisor, rounding_mode="trunc"))


def to_wire(tensor: torch.Tensor, prescale: float, compression: type[Compressor]) -> tuple[torch.Tensor, Any]:
    """A contiguous, prescaled host copy of `tensor` in a dtype MPI can reduce, and what from_wire needs to restore
    it (a GPU tensor's values travel through host memory, whatever MPI can read)."""
    wire, ctx = compression.compress(tensor.detach())
    unsummable = wire.dtype.is_floating_point and wire.dtype not in SUMMABLE
    dtype = torch.float32 if unsummable else wire.dtype
    work = wire.to(device="cpu", dtype=dtype, copy=True).contiguous()  # the input stays untouched
    _scale(work, prescale, 1)
    return work, (wire.dtype, ctx, compression, tensor.device)


def from_wire(work: torch.Tensor, restore: Any, op: str, postscale: float, ranks: int) -> torch.Tensor:
    """The reduced `work`, postscaled (and divided by `ranks` for Average), in the input's dtype."""
    _scale(work, postscale, ranks if op == Average else 1)
    dtype, ctx, compression, device = restore
    return compression.decompress(work.to(device=device, dtype=dtype), ctx)


def _allreduce_into(
    tensor: torch.Tensor,
    target: torch.Tensor,
    op: str,
    prescale: float,
    postscale: float,
    compression: type[Compressor],
    process_set: ProcessSet | None,
) -> Handle:
    """Start reducing `tensor` into `target` (same shape) over the set's ranks."""
    reduction, pset = wire_op(op), resolve(process_set)
    work, restore = to_wire(tensor, prescale, compression)

    def start(_: Any) -> Handle:
        request = pset.data.iallreduce(work, reduction)

        def finish() -> torch.Tensor:
            with torch.no_grad():
                target.copy_(from_wire(work, restore, op, postscale, pset.size()).view_as(target))
            return target

        return Handle(request, finish, keep=[work])

    # The row carries the wire's dtype: a joined rank adds zeros of that dtype.
    return agreed(pset, "allreduce", work, EVERYTHING, start, reduction=reduction)


def allreduce_async(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
    process_set: ProcessSet | None = None,
) -> Handle:
    """Start averaging (or summing) `tensor` over ranks; `synchronize` returns a new tensor."""
    op = resolve_op(op, average)
    target = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return named(
        name,
        lambda: _allreduce_into(tensor, target, op, prescale_factor, postscale_factor, compression, process_set),
    )


def allreduce(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet | None = None,
) -> torch.Tensor:
    """Average (default) or sum of `tensor` over ranks, as a new tensor; the input is not modified."""
    return grouped_allreduce([tensor], average, name, compression, op, prescale_factor, postscale_factor, process_set)[
        0
    ]


def allreduce_async_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet | None = None,
) -> Handle:
    """Start reducing `tensor` in place; `synchronize` returns `tensor`."""
    op = resolve_op(op, average)
    return named(
        name,
        lambda: _allreduce_into(tensor, tensor, op, prescale_factor, postscale_factor, Compression.none, process_set),
    )


def allreduce_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet | None = None,
) -> torch.Tensor:
    """Average (default) or sum `tensor` over ranks, in place; returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


def _names(name: str | None, count: int) -> list[str | None]:
    """One name per tensor of a grouped call (Horovod's name.0, name.1, ...)."""
    return [None if name is None else f"{name}.{i}" for i in range(count)]


def grouped_allreduce(
    tensors: list[torch.Tensor],
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet | None = None,
) -> list[torch.Tensor]:
    """allreduce of each tensor, all in flight together; differentiable."""
    op = resolve_op(op, average)
    scaling = {"prescale_factor": prescale_factor, "postscale_factor": postscale_factor, "process_set": process_set}

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        handles = [
            allreduce_async(t, None, n, op, compression=compression or Compression.none, **scaling)
            for t, n in zip(inputs, _names(name, len(inputs)))
        ]
        return tuple(synchronize(h) for h in handles)

    def gradient(*grads: torch.Tensor) -> list[torch.Tensor]:
        return grouped_allreduce(list(grads), op=op, **scaling)

    return list(differentiable(run, gradient, *tensors))


def grouped_allreduce_(
    tensors: list[torch.Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet | None = None,
) -> list[torch.Tensor]:
    """allreduce_ of each tensor in place, all in flight together; returns them."""
    handles = [
        allreduce_async_(t, average, n, op, prescale_factor, postscale_factor, process_set)
        for t, n in zip(tensors, _names(name, len(tensors)))
    ]
    return [synchronize(h) for h in handles]
