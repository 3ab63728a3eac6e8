"""Horovod's init, shutdown and world queries, answered by the process's one hpcdl World."""

from __future__ import annotations

from typing import Any

from hpcdl.comm import World, thread_multiple
from hpcdl.comm import init as world_of_process
from hpcdl.errors import HpcdlError
from hpcdl.horovod.refused import not_offered

# Horovod's "initialised" state: between init() and shutdown(). The World itself is hpcdl's
# one per process (comm.init), which outlives shutdown() so that a later init() finds it again.
_initialized = False


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Start MPI (once) and hpcdl's error handling: an uncaught exception on any rank ends every rank."""
    global _initialized
    if comm is not None or process_sets is not None:
        not_offered("init(comm=..., process_sets=...)", "hvd.add_process_set(ranks) after hvd.init()")
    world_of_process()
    _initialized = True


def current_world() -> World:
    """The World of this process; HpcdlError before hvd.init() or after hvd.shutdown()."""
    if not _initialized:
        raise HpcdlError("hpcdl.horovod: call hvd.init() first")
    return world_of_process()  # started once, then the same World on every call


def is_initialized() -> bool:
    """True between init() and shutdown()."""
    return _initialized


def shutdown() -> None:
    """Forget the world; MPI itself is finalised when the program exits (mpi4py does it)."""
    global _initialized
    _initialized = False


def size() -> int:
    """Number of ranks."""
    return current_world().size


def rank() -> int:
    """This rank."""
    return current_world().rank


def local_rank() -> int:
    """This rank's index on its node."""
    return current_world().local_rank


def local_size() -> int:
    """Ranks on this node."""
    return current_world().local_size


def cross_rank() -> int:
    """This rank's node index."""
    return current_world().node


def cross_size() -> int:
    """Number of nodes."""
    return current_world().num_nodes


def mpi_threads_supported() -> bool:
    """True when MPI was initialised with MPI_THREAD_MULTIPLE."""
    return thread_multiple()


def mpi_enabled() -> bool:
    """Always True: every collective here is MPI."""
    return True


def mpi_built() -> bool:
    """Always True."""
    return True


def gloo_enabled() -> bool:
    """Always False: hpcdl uses MPI only."""
    return False


def gloo_built() -> bool:
    """Always False."""
    return False


def nccl_built() -> bool:
    """Always False: every collective goes through MPI (CUDA tensors staged through host memory)."""
    return False


def ccl_built() -> bool:
    """Always False: no oneCCL."""
    return False


def cuda_built() -> bool:
    """True when torch has CUDA: CUDA tensors go through every collective (staged through host memory)."""
    import torch

    return torch.version.cuda is not None


def rocm_built() -> bool:
    """Always False."""
    return False


def ddl_built() -> bool:
    """Always False."""
    return False
