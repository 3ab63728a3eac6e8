"""The MPI world: who this rank is, how it talks, and how an error ends every rank."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
import torch

from hpcdl.errors import HpcdlError

T = TypeVar("T")

# Exit status of a job ended by an error (bad input, exception on any rank).
EXIT_ERROR = 2
# Exit status of a job stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: requeue me).
EXIT_REQUEUE = 75
# Seconds between printing an abort's cause and MPI_Abort, so the launcher forwards the line first.
ABORT_GRACE_S = 0.3


def mpi():
    """The mpi4py MPI module, imported on first use."""
    # Imported lazily so that single-process commands (data make, info) work without MPI.
    from mpi4py import MPI

    return MPI


@dataclass
class World:
    """This rank's place in the job: communicator, rank, size and node-local layout."""

    comm: object
    rank: int
    size: int
    local_rank: int
    local_size: int
    node: int
    num_nodes: int
    verbose: bool = False

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
        )

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise sum of a float64 vector over all ranks."""
        out = np.empty_like(values)
        self.comm.Allreduce(np.ascontiguousarray(values), out, op=mpi().SUM)
        return out

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        """Elementwise maximum of a vector over all ranks."""
        out = np.empty_like(values)
        self.comm.Allreduce(np.ascontiguousarray(values), out, op=mpi().MAX)
        return out

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails anywhere, end every rank with the first cause.

        This is the gate before the first collective that depends on input: every
        rank reaches the same allgather, so a failure on one rank cannot leave the
        others waiting in a later collective.
        """
        result, error = None, None
        try:
            result = fn()
        except HpcdlError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported with its type, then every rank exits
            error = f"{type(exc).__name__}: {exc}"
        errors = self.comm.allgather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
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


def abort(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """End the whole job from one rank, for the unexpected: print the cause, then MPI_Abort (never a hang)."""
    MPI = mpi()
    rank = MPI.COMM_WORLD.Get_rank()
    prefix = f"hpcdl: error (rank {rank})" if MPI.COMM_WORLD.Get_size() > 1 else "hpcdl: error"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    # The launcher forwards output asynchronously and drops what is pending when it kills the job.
    time.sleep(ABORT_GRACE_S)
    MPI.COMM_WORLD.Abort(code)


def _abort_on_exception(exc_type, exc, tb) -> None:
    # An uncaught exception on one rank would leave the others in a collective forever.
    if issubclass(exc_type, HpcdlError):
        abort(str(exc))
    traceback.print_exception(exc_type, exc, tb)
    abort(f"{exc_type.__name__}: {exc}")


def _node_layout(comm) -> tuple[int, int, int, int]:
    """(local_rank, local_size, node index, number of nodes) from a shared-memory split."""
    MPI = mpi()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, comm.Get_rank())
    local_rank, local_size = local.Get_rank(), local.Get_size()
    leaders = comm.Split(0 if local_rank == 0 else MPI.UNDEFINED, comm.Get_rank())
    node = comm.Get_rank() if local_rank == 0 else 0
    if leaders != MPI.COMM_NULL:
        node = leaders.Get_rank()
        num_nodes = leaders.Get_size()
        leaders.Free()
    else:
        num_nodes = 0
    node = local.bcast(node, root=0)
    num_nodes = comm.allreduce(num_nodes, op=MPI.MAX)
    local.Free()
    return local_rank, local_size, node, num_nodes


def threads_per_rank(local_size: int) -> int:
    """Cores this rank owns: Slurm's cpus-per-task, else its CPU binding, else node cores / ranks on it."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return max(1, int(slurm))
    cores = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if allowed < cores:
        return allowed  # the launcher bound this rank to its own cores
    return max(1, cores // max(1, local_size))


_WORLD: World | None = None  # the one World of this process (see init)


def init(verbose: bool = False, threads: int | None = None) -> World:
    """Start MPI once per process, find this rank's place, set torch threads, and make errors end every rank.

    Later calls return the same World (the first call's arguments count, except that
    `verbose` and `threads` given later still apply): the command line, `hpcdl.init`,
    `hpcdl.horovod.init` and `hpcdl.Pipeline` all share it.
    """
    global _WORLD
    if _WORLD is None:
        MPI = mpi()
        comm = MPI.COMM_WORLD
        sys.excepthook = _abort_on_exception
        local_rank, local_size, node, num_nodes = _node_layout(comm)
        torch.set_num_threads(threads or threads_per_rank(local_size))
        _WORLD = World(comm, comm.Get_rank(), comm.Get_size(), local_rank, local_size, node, num_nodes, verbose)
        return _WORLD
    if threads:
        torch.set_num_threads(threads)
    _WORLD.verbose = _WORLD.verbose or verbose
    return _WORLD


# torch dtype -> name of the MPI datatype that carries it. The one dtype map: every module asks `mpi_type`.
# bfloat16 travels as 16-bit words: MPI has no bfloat16 arithmetic, so it can be moved but not summed.
_MPI_TYPES = {
    torch.float64: "DOUBLE",
    torch.float32: "FLOAT",
    torch.float16: "FLOAT16_T",
    torch.bfloat16: "INT16_T",
    torch.int64: "INT64_T",
    torch.int32: "INT32_T",
    torch.int16: "INT16_T",
    torch.int8: "INT8_T",
    torch.uint8: "UINT8_T",
    torch.bool: "C_BOOL",
}
# Floating dtypes MPI can sum as they are; others are summed in a wider type by the caller.
SUMMABLE = (torch.float64, torch.float32, torch.float16)


def mpi_type(dtype: torch.dtype):
    """The MPI datatype that carries tensors of `dtype` (bfloat16 as raw 16-bit words)."""
    name = _MPI_TYPES.get(dtype)
    kind = getattr(mpi(), name, None) if name else None
    if kind is None or kind == mpi().DATATYPE_NULL:
        raise HpcdlError(f"tensors of dtype {dtype} cannot travel through MPI here (supported: {_supported()})")
    return kind


def _supported() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in _MPI_TYPES)


def as_buffer(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor, to hand to MPI without a copy (bfloat16 as its bits)."""
    if not tensor.is_contiguous():
        raise ValueError("MPI buffers must be contiguous tensors")
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the bits; only valid for copies, not reductions.
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def buffer(tensor: torch.Tensor) -> list:
    """[memory, MPI datatype] of a contiguous CPU tensor: what mpi4py's upper-case calls take."""
    return [as_buffer(tensor), mpi_type(tensor.dtype)]
