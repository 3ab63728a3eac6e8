"""Which rows each rank scores: `static` (an even block per rank) or `dynamic` (chunks claimed on demand).

`dynamic` hands out chunks of `batch` rows through a shared counter on rank 0 (`hpcdl.comm.SharedCounters`, one
MPI window for the whole pass): a claim is one atomic add, so no rank serves the others and a faster rank simply
claims more.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from hpcdl.comm import SharedCounters
from hpcdl.data.partition import Partition, StepPlan

SCHEDULES = ("static", "dynamic")
# The counters' slots in the window: the next chunk to hand out, and the rows scored so far (for the progress bar).
NEXT_CHUNK, ROWS_DONE = 0, 1
SLOTS = 2


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
