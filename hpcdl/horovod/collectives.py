"""Horovod's non-reducing collectives: allgather, broadcast, alltoall, join, barrier, and object forms.

Each tensor collective first agrees on metadata across the set (agreement.py), then is one MPI call
on the tensors' memory (a GPU tensor's through a host copy; results come back on its device); the `*_async`
forms return a Handle. The synchronous forms are differentiable
with Horovod's gradients: allgather's is this rank's slice of the averaged gradient, broadcast's the
averaged gradient on the root (zero elsewhere), alltoall's the reverse alltoall.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpcdl.horovod.agreement import AFTER_DIM_0, SHAPE, SPLITS, WITH_ROOT, agreed, join_and_serve
from hpcdl.horovod.autograd import differentiable
from hpcdl.horovod.basics import current_world
from hpcdl.horovod.errors import ArgumentError
from hpcdl.horovod.handles import Handle, named, synchronize
from hpcdl.horovod.process_sets import ProcessSet, resolve
from hpcdl.horovod.reductions import Average, allreduce


def _row_elements(tensor: torch.Tensor) -> int:
    return int(np.prod(tensor.shape[1:], dtype=np.int64))


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: ProcessSet | None = None) -> Handle:
    """Start concatenating every rank's `tensor` along dim 0 (first dims may differ)."""
    pset = resolve(process_set)
    source = tensor.detach().contiguous().cpu()
    if source.ndim == 0:
        raise ArgumentError("hpcdl.horovod.allgather: a scalar has no dim 0 to concatenate along; reshape it to (1,)")

    def start(table: np.ndarray) -> Handle:
        rows = table[:, SHAPE].tolist()
        output = torch.empty((sum(rows), *source.shape[1:]), dtype=source.dtype)
        counts = [r * _row_elements(source) for r in rows]
        request = pset.data.iallgatherv(source, output, counts)
        return Handle(request, lambda: output.to(tensor.device), keep=[source])

    return named(name, lambda: agreed(pset, "allgather", source, AFTER_DIM_0, start))


def grouped_allgather(
    tensors: list[torch.Tensor], name: str | None = None, process_set: ProcessSet | None = None
) -> list[torch.Tensor]:
    """allgather of each tensor, all in flight together; differentiable."""
    names = [None if name is None else f"{name}.{i}" for i in range(len(tensors))]

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        handles = [allgather_async(t, n, process_set) for t, n in zip(inputs, names)]
        return tuple(synchronize(h) for h in handles)

    def gradient(*grads: torch.Tensor) -> list[torch.Tensor]:
        # Every rank's rows of the averaged gradient; this rank's start where the lower ranks' rows end.
        rows = [len(t) for t in tensors]
        everyone = allgather(torch.tensor([rows], dtype=torch.int64), process_set=process_set)
        offsets = everyone[: resolve(process_set).rank()].sum(dim=0).tolist()
        averaged = [allreduce(g, op=Average, process_set=process_set) for g in grads]
        return [a.narrow(0, o, n) for a, o, n in zip(averaged, offsets, rows)]

    return list(differentiable(run, gradient, *tensors))


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: ProcessSet | None = None) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order; differentiable."""
    return grouped_allgather([tensor], name, process_set)[0]


def allgather_object(obj: Any, name: str | None = None, process_set: ProcessSet | None = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    return resolve(process_set).world.allgather(obj)


def broadcast_async_(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: ProcessSet | None = None
) -> Handle:
    """Start overwriting `tensor` on every rank with root_rank's, in place."""
    pset = resolve(process_set)
    root = pset.set_rank(root_rank)
    work = tensor.data if tensor.is_contiguous() and not tensor.is_cuda else tensor.detach().contiguous().cpu()

    def start(_: Any) -> Handle:
        request = pset.data.ibroadcast(work, root)

        def finish() -> torch.Tensor:
            if work.data_ptr() != tensor.data_ptr():
                with torch.no_grad():
                    tensor.copy_(work)
            return tensor

        return Handle(request, finish, keep=[work])

    return named(name, lambda: agreed(pset, "broadcast", work, WITH_ROOT, start, root=root_rank))


def broadcast_(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: ProcessSet | None = None
) -> torch.Tensor:
    """Overwrite `tensor` with root_rank's, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


def broadcast_async(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: ProcessSet | None = None
) -> Handle:
    """Start broadcasting root_rank's `tensor`; `synchronize` returns a new tensor."""
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: ProcessSet | None = None
) -> torch.Tensor:
    """root_rank's `tensor`, as a new tensor on every rank; the input is not modified; differentiable."""

    def run(t: torch.Tensor) -> torch.Tensor:
        return synchronize(broadcast_async(t, root_rank, name, process_set))

    def gradient(grad: torch.Tensor) -> tuple[torch.Tensor]:
        averaged = allreduce(grad, op=Average, process_set=process_set)
        return (averaged if current_world().rank == root_rank else averaged * 0,)

    return differentiable(run, gradient, tensor)


def broadcast_object(
    obj: Any, root_rank: int = 0, name: str | None = None, process_set: ProcessSet | None = None
) -> Any:
    """root_rank's picklable `obj` on every rank of the set."""
    pset = resolve(process_set)
    return pset.world.bcast(obj, root=pset.set_rank(root_rank))


def _send_rows(tensor: torch.Tensor, splits: torch.Tensor | list[int] | None, ranks: int) -> np.ndarray:
    """Rows of `tensor` for each rank; ArgumentError (a ValueError), before anything travels, for bad splits."""
    if splits is None:
        if tensor.ndim == 0 or tensor.shape[0] % ranks:
            raise ArgumentError(
                f"hpcdl.horovod.alltoall: without splits, dim 0 ({tuple(tensor.shape)}) must divide by {ranks} ranks"
            )
        return np.full(ranks, tensor.shape[0] // ranks, dtype=np.int64)
    # Horovod refuses all but int32; any integer tensor holds row counts as well (torch.tensor([...]) is int64).
    if torch.is_tensor(splits) and (
        splits.dtype.is_floating_point or splits.dtype.is_complex or splits.dtype == torch.bool
    ):
        raise ArgumentError(f"hpcdl.horovod.alltoall: splits must be an integer tensor, not {splits.dtype}")
    rows = np.asarray(splits.tolist() if torch.is_tensor(splits) else list(splits), dtype=np.int64)
    if tensor.ndim == 0 or rows.shape != (ranks,) or (rows < 0).any() or rows.sum() != tensor.shape[0]:
        raise ArgumentError(
            f"hpcdl.horovod.alltoall: splits {rows.tolist()} must be {ranks} non-negative row counts "
            f"summing to dim 0 of {tuple(tensor.shape)}"
        )
    return rows


def alltoall_async(
    tensor: torch.Tensor,
    splits: torch.Tensor | list[int] | None = None,
    name: str | None = None,
    process_set: ProcessSet | None = None,
) -> Handle:
    """Start sending rows `splits[r]` of `tensor` (along dim 0) to rank r of the set; see `alltoall`."""
    pset = resolve(process_set)
    source = tensor.detach().contiguous().cpu()
    send_rows = _send_rows(source, splits, pset.size())

    def start(table: np.ndarray) -> Handle:
        recv_rows = table[:, SPLITS + pset.rank()]
        row = _row_elements(source)
        output = torch.empty((int(recv_rows.sum()), *source.shape[1:]), dtype=source.dtype)
        request = pset.data.ialltoallv(source, (send_rows * row).tolist(), output, (recv_rows * row).tolist())
        received = torch.from_numpy(recv_rows.astype(np.int32))
        return Handle(request, lambda: (output.to(tensor.device), received), keep=[source])

    return named(name, lambda: agreed(pset, "alltoall", source, AFTER_DIM_0, start, splits=send_rows))


def alltoall(
    tensor: torch.Tensor,
    splits: torch.Tensor | list[int] | None = None,
    name: str | None = None,
    process_set: ProcessSet | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows `splits[r]` of `tensor` go to rank r (equal parts without splits), concatenated in rank order.

    Returns the received tensor; with `splits`, (tensor, received splits) as Horovod does. Differentiable:
    the gradient travels back by the reverse alltoall.
    """

    def run(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return synchronize(alltoall_async(t, splits, name, process_set))

    def gradient(grad: torch.Tensor, _: Any) -> tuple[torch.Tensor]:
        return (alltoall(grad, received, process_set=process_set)[0],)

    output, received = differentiable(run, gradient, tensor)
    return output if splits is None else (output, received)


def join(device: int = -1) -> int:
    """Wait for every rank, serving the others' allreduces with zeros meanwhile; returns the rank that joined last.

    As Horovod's: a rank out of data joins, and the ranks still training keep averaging over every rank
    (the joined ones add zeros); any other collective raises HorovodInternalError while a rank has joined.
    """
    return join_and_serve(resolve(None))


def barrier(process_set: ProcessSet | None = None) -> None:
    """Wait until every rank of the set gets here."""
    resolve(process_set).world.barrier()
