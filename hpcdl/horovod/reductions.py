"""Horovod's reductions: the op names, allreduce in its new-tensor, in-place, async and grouped forms.

A reduction runs on a copy of the input in a dtype MPI can reduce (the compression's, else the
tensor's; bfloat16 in float32, since MPI has no bfloat16 arithmetic), then lands in the target.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcdl.comm import SUMMABLE, buffer, mpi
from hpcdl.errors import HpcdlError
from hpcdl.horovod.basics import current_world, size
from hpcdl.horovod.collectives import Handle, synchronize
from hpcdl.horovod.compression import Compression, Compressor
from hpcdl.horovod.refused import no_process_set, not_offered

# Reduction ops, as Horovod names them.
Average, Sum, Adasum, Min, Max, Product = "average", "sum", "adasum", "min", "max", "product"


def mpi_op(op: str) -> Any:
    """The MPI reduction for a Horovod op (Average sums, then divides); Adasum and unknown ops raise."""
    MPI = mpi()
    ops = {Average: MPI.SUM, Sum: MPI.SUM, Min: MPI.MIN, Max: MPI.MAX, Product: MPI.PROD}
    if op == Adasum:
        not_offered("op=hvd.Adasum", "op=hvd.Average (the default) or op=hvd.Sum")
    if op not in ops:
        raise HpcdlError(f"hpcdl.horovod: unknown reduction op {op!r}; use hvd.Average, hvd.Sum, hvd.Min or hvd.Max")
    return ops[op]


def _resolve_op(op: str | None, average: bool | None) -> str:
    if op is not None and average is not None:
        raise HpcdlError("hpcdl.horovod: give op= or the deprecated average=, not both")
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


def _allreduce_into(
    tensor: torch.Tensor,
    target: torch.Tensor,
    op: str,
    prescale: float,
    postscale: float,
    compression: type[Compressor],
) -> Handle:
    """Start reducing `tensor` into `target` (same shape) over ranks."""
    reduction = mpi_op(op)
    wire, ctx = compression.compress(tensor.detach())
    unsummable = wire.dtype.is_floating_point and wire.dtype not in SUMMABLE
    work = wire.to(torch.float32 if unsummable else wire.dtype, copy=True).contiguous()  # the input stays untouched
    _scale(work, prescale, 1)
    request = current_world().comm.Iallreduce(mpi().IN_PLACE, buffer(work), op=reduction)

    def finish() -> torch.Tensor:
        _scale(work, postscale, size() if op == Average else 1)
        with torch.no_grad():
            target.copy_(compression.decompress(work.to(wire.dtype), ctx).view_as(target))
        return target

    return Handle(request, finish, keep=[work])


def allreduce_async(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
    process_set: Any = None,
) -> Handle:
    """Start averaging (or summing) `tensor` over ranks; `synchronize` returns a new tensor."""
    no_process_set(process_set)
    target = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _allreduce_into(tensor, target, _resolve_op(op, average), prescale_factor, postscale_factor, compression)


def allreduce(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> torch.Tensor:
    """Average (default) or sum of `tensor` over ranks, as a new tensor; the input is not modified."""
    handle = allreduce_async(
        tensor, average, name, op, prescale_factor, postscale_factor, compression or Compression.none, process_set
    )
    return synchronize(handle)


def allreduce_async_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> Handle:
    """Start reducing `tensor` in place; `synchronize` returns `tensor`."""
    no_process_set(process_set)
    return _allreduce_into(
        tensor, tensor, _resolve_op(op, average), prescale_factor, postscale_factor, Compression.none
    )


def allreduce_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> torch.Tensor:
    """Average (default) or sum `tensor` over ranks, in place; returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


def grouped_allreduce(
    tensors: list[torch.Tensor],
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] | None = None,
    op: str | None = None,
    **scale: float,
) -> list[torch.Tensor]:
    """allreduce of each tensor, all in flight together."""
    handles = [
        allreduce_async(t, average, name, op, compression=compression or Compression.none, **scale) for t in tensors
    ]
    return [synchronize(h) for h in handles]
