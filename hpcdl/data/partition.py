"""Which sample indices each rank reads at each step of an epoch.

`global`: one permutation of the whole split per (seed, epoch); each global batch
is cut into `size` contiguous local batches. The sample order, and so the result,
does not depend on the number of ranks.

`chunked`: like `global`, from an order that reads at disk speed (hpcdl.data.chunked):
blocks of consecutive rows in a random order, rows shuffled within windows of
blocks. Each global batch is sorted before it is cut, so a rank's share lies in a
band of the window's blocks: it reads about 1/size of each window, whole blocks at a
time, plus the blocks at its band's edges (with 16-block windows each block is read 1.2
times per epoch over 2 ranks, 1.6 over 4; every rank reading every block would be 2 and 4).
The sort changes only which rank holds which sample of the batch, not the batch.

`block`: each rank owns a contiguous block of the split (large sequential reads),
shuffled locally per epoch and cut into as many local batches as there are steps.
The local shuffle is windowed: windows of WINDOW_BATCHES local batches of
consecutive rows are visited in a random order, rows shuffled within each, so a
streaming reader reads each window once, sequentially.

Column splitting (parallel.mode = "columns") reads every sample of each global batch
on every rank, only its own feature columns: its rows are planned as `global` with
one data share (the strategy's DataShare has size 1).

Either way every sample is used exactly once per epoch. With `drop_last`, the
final partial global batch (`global`, `chunked`) or each block's tail beyond
steps x local batch (`block`) is left out, the same samples at any scale for `global` and `chunked`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcdl.data.chunked import BLOCK_ROWS, WINDOW_BLOCKS, chunked_order

NO_ROWS = np.empty(0, dtype=np.int64)
# Local batches per shuffle window of the `block` scheme: reads stay sequential, batches still mix.
WINDOW_BATCHES = 8


@dataclass(frozen=True)
class DataShare:
    """Which data a rank reads: share `rank` of the `size` shares of each global batch, and its feature columns."""

    rank: int | None  # None: this rank reads no rows (a parameter server), yet steps through the same batches
    size: int
    columns: tuple[int, int] | None = None  # [c0, c1) of every sample's features; None: all of them


@dataclass(frozen=True)
class StepPlan:
    """One step for one rank: the indices it reads, and the size of the whole global batch."""

    local: np.ndarray
    global_count: int


def block_sizes(length: int, parts: int) -> np.ndarray:
    """Sizes of np.array_split(range(length), parts): the remainder goes to the first parts.

    The one way hpcdl cuts anything into contiguous blocks: rows over ranks, feature
    columns over column ranks, a Linear's features over tensor ranks.
    """
    sizes = np.full(parts, length // parts, dtype=np.int64)
    sizes[: length % parts] += 1
    return sizes


def block_range(length: int, index: int, parts: int) -> tuple[int, int]:
    """[start, stop) of block `index` when `length` items are cut into `parts` blocks (see block_sizes)."""
    base, extra = divmod(length, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class Partition:
    """The per-step index plan of one rank for one split."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int | None,
        size: int,
        seed: int,
        scheme: str = "global",
        shuffle: bool = True,
        drop_last: bool = False,
        block_rows: int = BLOCK_ROWS,
        window_blocks: int = WINDOW_BLOCKS,
    ):
        self.n, self.batch_size, self.rank, self.size = n, batch_size, rank, size
        self.seed, self.scheme, self.shuffle, self.drop_last = seed, scheme, shuffle, drop_last
        self.block_rows, self.window_blocks = block_rows, window_blocks  # `chunked` only
        self.blocks = block_sizes(n, size)

    def steps_per_epoch(self) -> int:
        """Steps in one epoch; the same on every rank, so collectives stay matched."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def owned_range(self) -> tuple[int, int]:
        """The [start, stop) rows this rank can ever read: what it may cache."""
        if self.rank is None:
            return 0, 0
        if self.scheme == "block":
            start = int(self.blocks[: self.rank].sum())
            return start, start + int(self.blocks[self.rank])
        return 0, self.n

    def read_blocks(self) -> tuple[int, int] | None:
        """(rows per block, blocks to keep) for a streaming reader of the `chunked` order; None for the others.

        A rank's share of a step touches one band of its window's blocks, or two windows'
        where a batch straddles them: keeping two windows' blocks (more for batches larger
        than a window) reads each block once per epoch.
        """
        if self.scheme != "chunked" or not self.shuffle:
            return None
        return self.block_rows, self.window_blocks * (2 + self.batch_size // (self.window_blocks * self.block_rows))

    def epoch(self, epoch: int) -> list[StepPlan]:
        """This rank's plan for every step of `epoch` (empty rows for a rank that reads none)."""
        if self.rank is None:
            return [StepPlan(NO_ROWS, plan.global_count) for plan in self._plans(epoch, 0)]
        return self._plans(epoch, self.rank)

    def _plans(self, epoch: int, rank: int) -> list[StepPlan]:
        return self._block(epoch, rank) if self.scheme == "block" else self._global(epoch, rank)

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order over all ranks (`global`, `chunked`): a function of (seed, epoch) only."""
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.seed, epoch])
        if self.scheme == "chunked":
            return chunked_order(self.n, self.block_rows, self.window_blocks, rng)
        return rng.permutation(self.n)

    def _global(self, epoch: int, rank: int) -> list[StepPlan]:
        order = self._order(epoch)
        plans = []
        for step in range(self.steps_per_epoch()):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            if self.scheme == "chunked":
                batch = np.sort(batch)  # each rank's share: a band of the window's blocks (see module doc)
            local = np.array_split(batch, self.size)[rank]
            plans.append(StepPlan(local, len(batch)))
        return plans

    def _block(self, epoch: int, rank: int) -> list[StepPlan]:
        start = int(self.blocks[:rank].sum())
        order = np.arange(start, start + int(self.blocks[rank]))
        if self.shuffle:
            order = self._windowed_shuffle(order, np.random.default_rng([self.seed, epoch, rank]))
        steps = self.steps_per_epoch()
        if self.drop_last:
            local_batch = self.batch_size // self.size
            pieces = [order[s * local_batch : (s + 1) * local_batch] for s in range(steps)]
            counts = [local_batch * self.size] * steps
        else:
            pieces = np.array_split(order, steps)
            # Every rank's piece s has a size known from block lengths alone: no communication.
            per_rank = np.stack([block_sizes(int(b), steps) for b in self.blocks])
            counts = per_rank.sum(axis=0).tolist()
        return [StepPlan(piece, int(count)) for piece, count in zip(pieces, counts)]

    def _windowed_shuffle(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The block's windows in a random order, each window's rows shuffled within it.

        A window is WINDOW_BATCHES local batches of consecutive rows, so the batches
        of one window lie in one span of the file that a streaming reader reads once,
        sequentially (see SplitReader), instead of as scattered rows.
        """
        window = max(1, WINDOW_BATCHES * max(1, self.batch_size // self.size))
        windows = [order[i : i + window] for i in range(0, len(order), window)]
        return np.concatenate([rng.permutation(windows[w]) for w in rng.permutation(len(windows))] or [order])
