"""The World: this rank's place in the job, and every operation by which its ranks talk, as typed methods.

Objects travel pickled (`bcast`, `allgather`, `gather`, `send`, `recv`, `isend`). Arrays and tensors travel by
their memory, in the MPI datatype of the one dtype map (buffers.py). A blocking collective takes a tensor on any
device: a GPU tensor reaches MPI through its device's `Transport`, as it is where MPI is CUDA-aware, else through
a host copy. A non-blocking operation (`i...`, returning a `Request`) and a buffer sent point to point
(`send_buffer`, `recv_buffer`) take memory MPI can read as it is (an array, a CPU tensor, a GPU tensor where MPI
is CUDA-aware): the caller stages through `Transport` itself, so that the copies overlap its compute.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import numpy as np
import torch

from hpcdl.comm.buffers import Memory, Op, mpi_buffer, mpi_op, parts
from hpcdl.comm.failure import EXIT_ERROR, wait_for_all
from hpcdl.comm.library import mpi
from hpcdl.comm.requests import Request
from hpcdl.comm.transport import transport
from hpcdl.errors import HpcdlError, TrialFailed

T = TypeVar("T")


@dataclass
class World:
    """This rank's place in the job (rank, size, node-local layout) and the operations its ranks talk by."""

    comm: Any  # the mpi4py communicator, for a user's own MPI calls: hpcdl's modules use the methods below
    rank: int
    size: int
    local_rank: int
    local_size: int
    node: int
    num_nodes: int
    verbose: bool = False
    hosts: tuple[str, ...] = ()  # each rank's host name, for messages that must say where a rank runs
    # A contained world (a sweep's group): a failure its ranks agree on raises TrialFailed on each of them
    # instead of ending the process, so the group can go on to other work.
    contained: bool = False

    def where(self, rank: int) -> str:
        """' on HOST' for a rank of a job that spans hosts, else '' (one host needs no naming)."""
        return f" on {self.hosts[rank]}" if len(set(self.hosts)) > 1 else ""

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that speaks and writes files."""
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print from rank 0; other ranks print only when verbose, prefixed with their rank."""
        if self.is_root:
            print(message, flush=True)
        elif self.verbose:
            print(f"[rank {self.rank}] {message}", flush=True)

    # -- sub-worlds

    def split(self, color: int, key: int | None = None) -> World:
        """A sub-world of the ranks sharing `color` (ordered by `key`, default rank)."""
        sub = self.comm.Split(color, self.rank if key is None else key)
        return World(
            sub,
            sub.Get_rank(),
            sub.Get_size(),
            self.local_rank,
            self.local_size,
            self.node,
            self.num_nodes,
            self.verbose,
            tuple(sub.allgather(self.hosts[self.rank])) if self.hosts else (),
        )

    def dup(self) -> World:
        """The same ranks on a communicator of their own (a collective): its messages never match this World's."""
        return dataclasses.replace(self, comm=self.comm.Dup())

    def alone(self) -> World:
        """This rank by itself (MPI_COMM_SELF): collectives over one rank."""
        return dataclasses.replace(self, comm=mpi().COMM_SELF, rank=0, size=1, hosts=())

    def free(self) -> None:
        """Release a sub-world's communicator (a collective over its ranks); the World is not used afterwards."""
        self.comm.Free()

    # -- objects, pickled

    def bcast(self, obj: T, root: int = 0) -> T:
        """Rank `root`'s `obj` on every rank."""
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        return self.comm.allgather(obj)

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        """Every rank's `obj`, in rank order, on rank `root`; None elsewhere."""
        return self.comm.gather(obj, root=root)

    def send(self, obj: Any, dest: int, tag: int) -> None:
        """Send `obj` to rank `dest`."""
        self.comm.send(obj, dest=dest, tag=tag)

    def isend(self, obj: Any, dest: int, tag: int) -> Request:
        """Start sending `obj` to rank `dest`."""
        return Request(self.comm.isend(obj, dest=dest, tag=tag))

    def recv(self, source: int | None = None, *, tag: int) -> Any:
        """The next object sent with `tag` from rank `source` (None: from any rank)."""
        return self.comm.recv(source=_any_source(source), tag=tag)

    def iprobe(self, source: int | None = None, *, tag: int) -> bool:
        """Whether an object sent with `tag` from rank `source` (None: any rank) is waiting to be received."""
        return self.comm.iprobe(source=_any_source(source), tag=tag)

    def barrier(self) -> None:
        """Return once every rank has called it."""
        self.comm.Barrier()

    def ibarrier(self) -> Request:
        """Start a barrier: it finishes once every rank has started it."""
        return Request(self.comm.Ibarrier())

    # -- arrays and tensors, blocking (a tensor on any device)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise sum of an array over all ranks, as a new array."""
        out = np.empty_like(values)
        self.comm.Allreduce(np.ascontiguousarray(values), out, op=mpi().SUM)
        return out

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        """Elementwise maximum of an array over all ranks, as a new array."""
        out = np.empty_like(values)
        self.comm.Allreduce(np.ascontiguousarray(values), out, op=mpi().MAX)
        return out

    def allreduce_(self, memory: Memory, op: Op = "sum") -> None:
        """Reduce `memory` (an array, or a contiguous tensor) over the ranks, in place."""
        with _for_mpi(memory) as readable:
            self.comm.Allreduce(mpi().IN_PLACE, mpi_buffer(readable), op=mpi_op(op))

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        """Overwrite a contiguous `tensor` with rank `root`'s, in place."""
        with transport(tensor.device).for_mpi(tensor, read=self.rank == root) as readable:
            self.comm.Bcast(mpi_buffer(readable), root=root)

    def allgather_(self, tensor: torch.Tensor) -> None:
        """Fill a contiguous `tensor`, cut in `size` equal parts, with part r of rank r, in place."""
        with transport(tensor.device).for_mpi(tensor) as readable:
            self.comm.Allgather(mpi().IN_PLACE, mpi_buffer(readable))

    # -- point-to-point and non-blocking, on memory MPI can read as it is

    def send_buffer(self, memory: Memory, dest: int, tag: int) -> None:
        """Send `memory` to rank `dest`."""
        self.comm.Send(mpi_buffer(memory), dest=dest, tag=tag)

    def recv_buffer(self, memory: Memory, source: int, tag: int) -> None:
        """Receive into `memory` what rank `source` sends with `tag`."""
        self.comm.Recv(mpi_buffer(memory), source=source, tag=tag)

    def iallreduce(self, memory: Memory, op: Op = "sum") -> Request:
        """Start reducing `memory` over the ranks, in place."""
        return Request(self.comm.Iallreduce(mpi().IN_PLACE, mpi_buffer(memory), op=mpi_op(op)))

    def ibroadcast(self, memory: Memory, root: int) -> Request:
        """Start overwriting `memory` with rank `root`'s, in place."""
        return Request(self.comm.Ibcast(mpi_buffer(memory), root=root))

    def iallgather(self, mine: Memory, table: Memory) -> Request:
        """Start gathering every rank's `mine` into the rows of `table`, in rank order."""
        return Request(self.comm.Iallgather(mpi_buffer(mine), mpi_buffer(table)))

    def iallgatherv(self, source: torch.Tensor, output: torch.Tensor, counts: list[int]) -> Request:
        """Start concatenating every rank's `source` into `output`, in rank order (`counts[r]` elements of rank r)."""
        return Request(self.comm.Iallgatherv(mpi_buffer(source), parts(output, counts)))

    def ialltoallv(
        self, source: torch.Tensor, send_counts: list[int], output: torch.Tensor, recv_counts: list[int]
    ) -> Request:
        """Start sending `send_counts[r]` elements of `source`, in order, to rank r; `output` receives
        `recv_counts[r]` elements from rank r, in rank order."""
        return Request(self.comm.Ialltoallv(parts(source, send_counts), parts(output, recv_counts)))

    def ireduce_scatter(self, source: torch.Tensor, output: torch.Tensor, counts: list[int], op: Op = "sum") -> Request:
        """Start reducing `source` over the ranks; `output` receives rank r's part of it (`counts[r]` elements)."""
        return Request(self.comm.Ireduce_scatter(mpi_buffer(source), mpi_buffer(output), counts, op=mpi_op(op)))

    def isend_buffer(self, memory: Memory, dest: int, tag: int) -> Request:
        """Start sending `memory` to rank `dest`."""
        return Request(self.comm.Isend(mpi_buffer(memory), dest=dest, tag=tag))

    def irecv_buffer(self, memory: Memory, source: int, tag: int) -> Request:
        """Start receiving into `memory` what rank `source` sends with `tag`."""
        return Request(self.comm.Irecv(mpi_buffer(memory), source=source, tag=tag))

    # -- failing together

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails anywhere, end every rank with the first cause.

        This is the gate before the first collective that depends on input: every
        rank reaches the same allgather, so a failure on one rank cannot leave the
        others waiting in a later collective. A rank that never calls it (code that runs
        on some ranks only) ends the job after the set-up limit instead of hanging it.
        """
        wait_for_all(self.comm, f"World.agree (called from {sys._getframe(1).f_code.co_qualname})")
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - reported as one line (with its type unless ours), then every rank exits
            error = str(exc) if isinstance(exc, HpcdlError) else f"{type(exc).__name__}: {exc}"
            if self.verbose:  # --verbose: where it came from, for a bug report
                traceback.print_exception(exc)
        errors = self.allgather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            if self.contained:
                raise TrialFailed(message)
            if self.is_root:
                # The same message from every rank is one cause, not one rank's.
                where = f" (rank {rank})" if self.size > 1 and len(set(errors)) > 1 else ""
                print(f"hpcdl: error{where}: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_ERROR)
        return result

    def fail_all(self, message: str) -> NoReturn:
        """End every rank with `message`: for a verdict every rank reached at the same point (see `agree`)."""
        self.agree(lambda: _raise(HpcdlError(message)))
        raise AssertionError("agree returns only when nothing failed")  # pragma: no cover


def _raise(error: Exception) -> NoReturn:
    raise error


def _any_source(source: int | None) -> int:
    return mpi().ANY_SOURCE if source is None else source


def _for_mpi(memory: Memory) -> AbstractContextManager[Memory]:
    """`memory` as MPI can read and write it: an array as it is, a tensor through its device's `Transport`."""
    return nullcontext(memory) if isinstance(memory, np.ndarray) else transport(memory.device).for_mpi(memory)
