"""Horovod's sparse allreduce: every rank's (indices, values) gathered, which sums a sparse tensor over ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hpcdl.horovod.collectives import allgather_async
from hpcdl.horovod.handles import synchronize
from hpcdl.horovod.process_sets import ProcessSet, resolve
from hpcdl.horovod.reductions import Average, Sum


def sparse_allreduce_async(
    tensor: torch.Tensor, name: str | None = None, op: str = Average, process_set: ProcessSet | None = None
) -> Callable[[], torch.Tensor]:
    """Start summing (or averaging) a sparse COO tensor over the set; calling the result waits and returns it."""
    if op not in (Average, Sum):
        raise ValueError(f"hpcdl.horovod.sparse_allreduce_async: op must be hvd.Average or hvd.Sum, not {op!r}")
    ranks = resolve(process_set).size()
    local = tensor.coalesce()
    # Indices as rows (nnz, ndim), so allgather concatenates each rank's entries along dim 0.
    indices = allgather_async(
        local.indices().t().contiguous(), None if name is None else f"{name}.indices", process_set
    )
    values = allgather_async(local.values(), None if name is None else f"{name}.values", process_set)

    def finish() -> torch.Tensor:
        gathered = synchronize(values)
        entries = gathered / ranks if op == Average else gathered
        merged = torch.sparse_coo_tensor(synchronize(indices).t(), entries, local.shape, check_invariants=True)
        return merged.coalesce()  # sums the entries ranks share

    return finish
