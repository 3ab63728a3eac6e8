"""Which rows each rank scores: `static` (an even block per rank) or `dynamic` (chunks claimed on demand).

`dynamic` hands out chunks of `batch` rows through a shared counter in an MPI window on rank 0: a claim is one
`MPI_Fetch_and_op` (atomic add), so no rank serves the others and a faster rank simply claims more. Measured with
MPICH 5.0.2 (ch4) on one node, a claim takes 2-4 us while rank 0 computes without entering MPI, provided the window
comes from `Win.Allocate` and one `Lock_all` epoch spans the whole pass. With a `Lock`/`Unlock` pair per claim, or
a `Win.Create` window, the first claim waited 1.8 s until rank 0 next entered MPI (passive-target progress).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from hpcdl.comm import mpi
from hpcdl.data.partition import Partition, StepPlan

SCHEDULES = ("static", "dynamic")
# The counters' slots in the window: the next chunk to hand out, and the rows scored so far (for the progress bar).
NEXT_CHUNK, ROWS_DONE = 0, 1


class SharedCounters:
    """Two int64 counters on rank 0 that every rank adds to atomically, without rank 0 taking part."""

    def __init__(self, comm) -> None:
        MPI = mpi()
        self.MPI = MPI
        self.win = MPI.Win.Allocate(2 * 8 if comm.Get_rank() == 0 else 0, 8, comm=comm)
        if comm.Get_rank() == 0:
            self.win.Lock(0, MPI.LOCK_EXCLUSIVE)
            np.frombuffer(self.win.tomemory(), dtype=np.int64)[:] = 0
            self.win.Unlock(0)
        comm.Barrier()
        self.win.Lock_all()  # one epoch for the pass: a claim then needs no lock, hence no help from rank 0

    def add(self, slot: int, value: int) -> int:
        """Add `value` to counter `slot`; its value before the addition."""
        before = np.zeros(1, dtype=np.int64)  # per call: the prefetch thread and the loop may add at once
        self.win.Fetch_and_op(np.array([value], dtype=np.int64), before, 0, slot, self.MPI.SUM)
        self.win.Flush(0)
        return int(before[0])

    def close(self) -> None:
        """End the epoch and free the window (collective)."""
        self.win.Unlock_all()
        self.win.Free()


def static_plan(rows: int, batch: int, rank: int, size: int) -> Partition:
    """Rank `rank`'s contiguous block of the split (block_sizes' split), in pieces of about `batch` rows, in order."""
    return Partition(rows, batch * size, rank, size, seed=0, scheme="block", shuffle=False)


class ClaimedChunks:
    """Chunks of `batch` consecutive rows, each claimed from the shared counter when the reader reaches it.

    A plan for `Loader` in place of a `Partition`: the prefetch thread claims the next chunk only when it is
    about to read it, so a rank holds at most `prefetch` + 1 claimed chunks it has not scored.
    """

    def __init__(self, counters: SharedCounters, rows: int, batch: int) -> None:
        self.counters, self.rows, self.batch = counters, rows, batch

    def epoch(self, epoch: int) -> ClaimedChunks:
        """The one pass (Loader asks for an epoch's plans)."""
        return self

    def __getitem__(self, steps: slice) -> Iterator[StepPlan]:
        # Loader takes plans[start_step:]; a pass always starts at step 0 and claims as it goes.
        return self._claims()

    def _claims(self) -> Iterator[StepPlan]:
        while (start := self.counters.add(NEXT_CHUNK, 1) * self.batch) < self.rows:
            stop = min(start + self.batch, self.rows)
            yield StepPlan(np.arange(start, stop), stop - start)
