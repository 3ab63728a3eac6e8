"""Horovod's reducescatter: reduce over the set's ranks and keep this rank's rows of the result.

Dim 0 is split as Horovod splits it: the first (rows % size) ranks get one row more. The synchronous
forms are differentiable with Horovod's gradient: the allgather of the gradient (times the set's size
for Sum, as Horovod's), with the same scaling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpcdl.horovod.agreement import EVERYTHING, agreed
from hpcdl.horovod.autograd import differentiable
from hpcdl.horovod.collectives import grouped_allgather
from hpcdl.horovod.compression import Compression, Compressor
from hpcdl.horovod.errors import ArgumentError
from hpcdl.horovod.handles import Handle, named, synchronize
from hpcdl.horovod.process_sets import ProcessSet, resolve
from hpcdl.horovod.reductions import Average, Sum, from_wire, to_wire, wire_op


def _rows(total: int, ranks: int) -> list[int]:
    """Each rank's rows of a dim 0 of `total`, as Horovod splits it."""
    return [total // ranks + (r < total % ranks) for r in range(ranks)]


def reducescatter_async(
    tensor: torch.Tensor,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: str = Average,
    process_set: ProcessSet | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Handle:
    """Start reducing `tensor` over the set and scattering dim 0; `synchronize` returns this rank's rows."""
    if op not in (Average, Sum):
        wire_op(op)  # Adasum: the refusal
        raise ArgumentError(f"hpcdl.horovod.reducescatter: op must be hvd.Average or hvd.Sum, not {op!r}")
    if tensor.ndim == 0:
        raise ArgumentError("hpcdl.horovod.reducescatter: a scalar has no dim 0 to scatter; reshape it to (1,)")
    pset = resolve(process_set)
    work, restore = to_wire(tensor, prescale_factor, compression)
    rows = _rows(tensor.shape[0], pset.size())
    row = int(np.prod(tensor.shape[1:], dtype=np.int64))

    def start(_: Any) -> Handle:
        mine = torch.empty((rows[pset.rank()], *tensor.shape[1:]), dtype=work.dtype)
        request = pset.data.ireduce_scatter(work, mine, [r * row for r in rows], wire_op(op))
        return Handle(request, lambda: from_wire(mine, restore, op, postscale_factor, pset.size()), keep=[work, mine])

    return named(name, lambda: agreed(pset, "reducescatter", tensor, EVERYTHING, start))


def grouped_reducescatter(
    tensors: list[torch.Tensor],
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: str = Average,
    process_set: ProcessSet | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> list[torch.Tensor]:
    """reducescatter of each tensor, all in flight together; differentiable."""
    names = [None if name is None else f"{name}.{i}" for i in range(len(tensors))]
    scaling = {"prescale_factor": prescale_factor, "postscale_factor": postscale_factor}

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        handles = [reducescatter_async(t, n, compression, op, process_set, **scaling) for t, n in zip(inputs, names)]
        return tuple(synchronize(h) for h in handles)

    def gradient(*grads: torch.Tensor) -> list[torch.Tensor]:
        factor = prescale_factor * postscale_factor * (resolve(process_set).size() if op == Sum else 1)
        return [g * factor for g in grouped_allgather(list(grads), process_set=process_set)]

    return list(differentiable(run, gradient, *tensors))


def reducescatter(
    tensor: torch.Tensor,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: str = Average,
    process_set: ProcessSet | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> torch.Tensor:
    """This rank's rows of the average (default) or sum of `tensor` over the set's ranks; differentiable."""
    return grouped_reducescatter([tensor], name, compression, op, process_set, prescale_factor, postscale_factor)[0]
