"""Non-blocking operations in flight: a `Request` to wait for or test, and `waitall`, `testall`, `waitany`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from hpcdl.comm.library import mpi


class Request:
    """An operation in flight; its buffers are MPI's until `wait()` returns or `test()` says it has finished."""

    __slots__ = ("mpi_request",)

    def __init__(self, mpi_request: Any):
        self.mpi_request = mpi_request

    def wait(self) -> None:
        """Block until the operation has finished."""
        self.mpi_request.Wait()

    def test(self) -> bool:
        """Whether the operation has finished (a call into MPI, which moves it forward)."""
        return bool(self.mpi_request.Test())


def waitall(requests: Iterable[Request]) -> None:
    """Block until every request has finished."""
    mpi().Request.Waitall([r.mpi_request for r in requests])


def testall(requests: Iterable[Request]) -> bool:
    """Whether every request has finished; MPI moves each forward (it progresses only inside MPI calls)."""
    return bool(mpi().Request.Testall([r.mpi_request for r in requests]))


def waitany(requests: Sequence[Request]) -> int:
    """Block until one of the requests has finished; its index."""
    return mpi().Request.Waitany([r.mpi_request for r in requests])
