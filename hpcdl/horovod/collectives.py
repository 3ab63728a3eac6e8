"""Horovod's handles and its non-reducing collectives: allgather, broadcast, alltoall, join, barrier.

Each is an MPI call on the tensors' memory (no copies where none are needed); the `*_async` forms
return a Handle, which `synchronize` waits for and `poll` tests, as Horovod's integer handles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcdl.comm import as_buffer, buffer, mpi_type
from hpcdl.errors import HpcdlError
from hpcdl.horovod.basics import current_world, size
from hpcdl.horovod.refused import no_process_set


@dataclass
class Handle:
    """A collective in flight; `synchronize(handle)` waits for it and returns its result."""

    request: Any
    finish: Callable[[], Any]
    result: Any = None
    done: bool = False
    keep: list = field(default_factory=list)  # buffers MPI is still using


def poll(handle: Handle) -> bool:
    """True when the collective has finished (synchronize then returns at once)."""
    return handle.done or bool(handle.request.Test())


def synchronize(handle: Handle) -> Any:
    """Wait for an async collective and return its result."""
    if not handle.done:
        handle.request.Wait()
        handle.result, handle.done, handle.keep = handle.finish(), True, []
    return handle.result


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> Handle:
    """Start concatenating every rank's `tensor` along dim 0 (first dims may differ)."""
    no_process_set(process_set)
    source = tensor.detach().contiguous()
    # The shapes travel first (small, blocking): the receiving side needs every rank's row count.
    shapes = current_world().comm.allgather((tuple(source.shape), str(source.dtype)))
    if len({(s[1:], d) for s, d in shapes}) != 1 or any(len(s) == 0 for s, _ in shapes):
        found = ", ".join(f"rank {r}: {d} {tuple(s)}" for r, (s, d) in enumerate(shapes))
        raise HpcdlError(
            "hpcdl.horovod.allgather: tensors must have the same dtype and the same shape after dim 0 "
            f"on every rank ({found})"
        )
    rows = [s[0] for s, _ in shapes]
    row = int(np.prod(source.shape[1:], dtype=np.int64))
    output = torch.empty((sum(rows), *source.shape[1:]), dtype=source.dtype)
    counts = [r * row for r in rows]
    request = current_world().comm.Iallgatherv(buffer(source), [as_buffer(output), counts, mpi_type(output.dtype)])
    return Handle(request, lambda: output, keep=[source])


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order."""
    return synchronize(allgather_async(tensor, name, process_set))


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    return current_world().comm.allgather(obj)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> Handle:
    """Start overwriting `tensor` on every rank with root_rank's, in place."""
    no_process_set(process_set)
    work = tensor.data if tensor.is_contiguous() else tensor.detach().contiguous()
    request = current_world().comm.Ibcast(buffer(work), root=root_rank)

    def finish() -> torch.Tensor:
        if work.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(work)
        return tensor

    return Handle(request, finish, keep=[work])


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """Overwrite `tensor` with root_rank's, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> Handle:
    """Start broadcasting root_rank's `tensor`; `synchronize` returns a new tensor."""
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """root_rank's `tensor`, as a new tensor on every rank; the input is not modified."""
    return synchronize(broadcast_async(tensor, root_rank, name, process_set))


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None, process_set: Any = None) -> Any:
    """root_rank's picklable `obj` on every rank."""
    no_process_set(process_set)
    return current_world().comm.bcast(obj, root=root_rank)


def alltoall_async(
    tensor: torch.Tensor,
    splits: torch.Tensor | list[int] | None = None,
    name: str | None = None,
    process_set: Any = None,
) -> Handle:
    """Start sending rows `splits[r]` of `tensor` (along dim 0) to rank r; see `alltoall`."""
    no_process_set(process_set)
    source = tensor.detach().contiguous()
    ranks = size()
    if splits is None:
        if source.ndim == 0 or source.shape[0] % ranks:
            raise HpcdlError(
                f"hpcdl.horovod.alltoall: without splits, dim 0 ({tuple(source.shape)}) must divide by {ranks} ranks"
            )
        send_rows = np.full(ranks, source.shape[0] // ranks, dtype=np.int64)
    else:
        send_rows = np.asarray(splits.tolist() if torch.is_tensor(splits) else list(splits), dtype=np.int64)
        if send_rows.shape != (ranks,) or (send_rows < 0).any() or send_rows.sum() != source.shape[0]:
            raise HpcdlError(
                f"hpcdl.horovod.alltoall: splits {send_rows.tolist()} must be {ranks} non-negative row counts "
                f"summing to dim 0 = {source.shape[0]}"
            )
    recv_rows = np.empty(ranks, dtype=np.int64)
    current_world().comm.Alltoall(send_rows, recv_rows)
    row = int(np.prod(source.shape[1:], dtype=np.int64))
    output = torch.empty((int(recv_rows.sum()), *source.shape[1:]), dtype=source.dtype)
    kind = mpi_type(source.dtype)
    request = current_world().comm.Ialltoallv(
        [as_buffer(source), (send_rows * row).tolist(), kind], [as_buffer(output), (recv_rows * row).tolist(), kind]
    )
    received = torch.from_numpy(recv_rows.astype(np.int32))
    return Handle(request, lambda: output if splits is None else (output, received), keep=[source])


def alltoall(
    tensor: torch.Tensor,
    splits: torch.Tensor | list[int] | None = None,
    name: str | None = None,
    process_set: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows `splits[r]` of `tensor` go to rank r (equal parts without splits), concatenated in rank order.

    Returns the received tensor; with `splits`, (tensor, received splits) as Horovod does.
    """
    return synchronize(alltoall_async(tensor, splits, name, process_set))


def join(device: int = -1) -> int:
    """Wait for every rank; returns the rank that arrived last.

    Unlike Horovod, ranks that joined do not keep serving the others' allreduces: every
    rank must run the same number of collectives before joining (split the data evenly).
    """
    world = current_world()
    began = time.perf_counter()
    world.comm.Barrier()
    waited = time.perf_counter() - began
    # The last to arrive waited least: a local duration, no clocks compared across nodes.
    waits = world.comm.allgather(waited)
    return int(np.argmin(waits))


def barrier(process_set: Any = None) -> None:
    """Wait until every rank gets here."""
    no_process_set(process_set)
    current_world().comm.Barrier()
