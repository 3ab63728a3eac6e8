"""The MPI library: mpi4py imported on first use, and what the library is and can do."""

from __future__ import annotations

from types import ModuleType


def mpi() -> ModuleType:
    """The mpi4py MPI module, imported on first use."""
    # Imported lazily so that single-process commands (data make, info) work without MPI.
    from mpi4py import MPI

    return MPI


def library_version() -> str:
    """The first line of what the MPI library says of itself: its name and version."""
    return mpi().Get_library_version().splitlines()[0]


def bindings_version() -> str:
    """The version of mpi4py, the bindings hpcdl reaches MPI through."""
    import mpi4py

    return mpi4py.__version__


def thread_multiple() -> bool:
    """Whether MPI runs with MPI_THREAD_MULTIPLE: calls from several threads at once are safe."""
    MPI = mpi()
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE
