"""How an error ends every rank: exit statuses, MPI_Abort with the cause said first, and the set-up limit that
ends a job whose ranks do not all reach a start-up collective."""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import NoReturn

import numpy as np

from hpcdl.comm.library import mpi
from hpcdl.errors import HpcdlError

# Exit status of a job ended by an error (bad input, exception on any rank).
EXIT_ERROR = 2
# Exit status of a job stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: requeue me).
EXIT_REQUEUE = 75
# Seconds between printing an abort's cause and MPI_Abort, so the launcher forwards the line first.
ABORT_GRACE_S = 0.3
# Seconds a rank other than 0 waits before it reports an error that rank 0 may be reporting too:
# rank 0's abort usually ends it first, so the job shows one message, not one per rank.
PEER_DELAY_S = 1.0
# The set-up limit: how long a start-up collective waits for ranks that never come (0 = forever).
SETUP_TIMEOUT_ENV, SETUP_TIMEOUT_S = "HPCDL_SETUP_TIMEOUT_S", 60.0
# Tag of the notes "I have arrived" that ranks send rank 0 at a start-up collective (see wait_for_all).
ARRIVED_TAG = 30917


def abort(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """End the whole job from one rank, for the unexpected: print the cause, then MPI_Abort (never a hang)."""
    MPI = mpi()
    rank = MPI.COMM_WORLD.Get_rank()
    prefix = f"hpcdl: error (rank {rank})" if MPI.COMM_WORLD.Get_size() > 1 else "hpcdl: error"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    # The launcher forwards output asynchronously and drops what is pending when it kills the job.
    time.sleep(ABORT_GRACE_S)
    MPI.COMM_WORLD.Abort(code)


def abort_on_exception(exc_type, exc, tb) -> None:
    """sys.excepthook of a rank: an uncaught exception ends the whole job (its traceback, then MPI_Abort)."""
    # An uncaught exception on one rank would leave the others in a collective forever.
    if mpi().COMM_WORLD.Get_rank() != 0:
        time.sleep(PEER_DELAY_S)  # a bug often strikes every rank: one traceback, rank 0's
    if issubclass(exc_type, HpcdlError):
        abort(str(exc))
    if issubclass(exc_type, KeyboardInterrupt):
        abort("interrupted by SIGINT outside the training loop (nothing to checkpoint there)")
    traceback.print_exception(exc_type, exc, tb)
    abort(f"{exc_type.__name__}: {exc}")


def setup_timeout_s() -> float:
    """The set-up limit in seconds: HPCDL_SETUP_TIMEOUT_S, default 60; 0 waits forever."""
    value = os.environ.get(SETUP_TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else SETUP_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise HpcdlError(f"{SETUP_TIMEOUT_ENV}={value!r} must be a number of seconds >= 0 (0 waits forever)")
    return seconds


def wait_for_all(comm, what: str) -> None:
    """Return once every rank of `comm` has reached `what`; end the job if some do not within the set-up limit.

    A non-blocking barrier, polled against a deadline: a rank that never comes (code that
    runs on some ranks only, a rank stopped at start-up) would hold every other rank in the
    next blocking collective forever. Each rank also sends rank 0 a note on arrival, so that
    rank 0 can name who came and who did not.
    """
    limit, size = setup_timeout_s(), comm.Get_size()
    if size == 1 or limit == 0:
        return
    MPI, rank = mpi(), comm.Get_rank()
    notes = np.zeros(size, dtype=np.uint8)
    if rank == 0:
        arrivals = [comm.Irecv([notes[r : r + 1], MPI.BYTE], source=r, tag=ARRIVED_TAG) for r in range(1, size)]
    else:
        arrivals = [comm.Isend([notes[:1], MPI.BYTE], dest=0, tag=ARRIVED_TAG)]
    barrier = comm.Ibarrier()
    # Rank 0 names who came; the others wait a little longer, so that its line usually ends the job.
    deadline = time.monotonic() + limit + (0 if rank == 0 else max(PEER_DELAY_S, limit / 10))
    pause = 1e-4
    while not barrier.Test():
        if time.monotonic() > deadline:
            came = [0, *(r for r, note in enumerate(arrivals, 1) if note.Test())] if rank == 0 else None
            abort(_setup_timeout_message(what, limit, size, came))
        time.sleep(pause)
        pause = min(2 * pause, 0.01)
    MPI.Request.Waitall(arrivals)


def _setup_timeout_message(what: str, limit: float, size: int, came: list[int] | None) -> str:
    """The one line of a set-up timeout: who came (as rank 0 knows it), and the likely causes."""
    causes = (
        "is every rank running the same code? (e.g. hpcdl.fit called on rank 0 only); "
        f"a rank still busy (or a slow start) needs {SETUP_TIMEOUT_ENV} set higher"
    )
    if came is None:
        return f"set-up: not every rank reached {what} within {limit:g} s, and rank 0 did not say who; {causes}"
    missing = [r for r in range(size) if r not in came]
    return (
        f"set-up: only rank(s) {rank_ranges(came)} of {size} reached {what} within {limit:g} s; "
        f"rank(s) {rank_ranges(missing)} did not; {causes}"
    )


def rank_ranges(ranks: list[int]) -> str:
    """Sorted ranks as ranges, e.g. [0, 1, 2, 5] -> '0-2, 5' (a line stays short at thousands of ranks)."""
    parts: list[list[int]] = []
    for rank in sorted(ranks):
        if parts and parts[-1][1] == rank - 1:
            parts[-1][1] = rank
        else:
            parts.append([rank, rank])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)
