"""Reading a rank's batches from HDF5: cached or streamed, coalesced reads, prefetch, copies to a GPU."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from hpcdl.data.direct import DirectRows
from hpcdl.data.partition import Partition, StepPlan
from hpcdl.device import CPU, BatchCopier
from hpcdl.errors import DataError

if TYPE_CHECKING:
    from hpcdl.comm import World

# HDF5's per-dataset chunk cache: large enough that random reads reuse decompressed chunks.
CHUNK_CACHE_BYTES = 64 << 20
# A streaming reader keeps all labels (or regression targets) of its rows in memory up to this size.
LABEL_CACHE_BYTES = 64 << 20
# A streamed batch is read as one sequential span (kept for the next batches) when the span
# is at most SPAN_DENSITY times its rows and at most SPAN_BYTES: a `block` window, a val pass.
SPAN_DENSITY, SPAN_BYTES = 16, 32 << 20
# Steps ahead whose rows a streaming reader asks the kernel for (one `block` shuffle window).
READ_AHEAD_STEPS = 8


@dataclass
class Batch:
    """One rank's share of one global batch."""

    x: torch.Tensor
    y: torch.Tensor  # int64 class labels (n,), or float32 regression targets (n, *target_shape)
    global_count: int
    wait_s: float = 0.0  # time the training step waited for this batch
    indices: np.ndarray | None = None  # the split's rows it holds, in order (None for a batch built by hand)
    copied: object = None  # a GPU batch: the event that ends its copy from host memory (None: ready)


def contiguous_runs(sorted_indices: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, offset) runs of consecutive indices, so each run is one hyperslab read."""
    if len(sorted_indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(sorted_indices)]))
    return [(int(sorted_indices[a]), int(sorted_indices[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


class BlockCache:
    """Whole blocks of a `chunked` order in memory, the least recently used replaced first.

    A rank's rows of a step come from a few blocks, each read as one contiguous slice;
    the same blocks serve its next steps until their window is used up, so every block
    is read once per epoch.
    """

    def __init__(self, n: int, block_rows: int, capacity: int, x_row: np.ndarray, y_row: np.ndarray):
        """Room for `capacity` blocks of rows shaped and typed as `x_row` (features) and `y_row` (target)."""
        self.n, self.block_rows = n, block_rows
        self.x = np.empty((capacity * block_rows, *x_row.shape), dtype=x_row.dtype)
        self.y = np.empty((capacity * block_rows, *y_row.shape), dtype=y_row.dtype)
        self.free = list(range(capacity - 1, -1, -1))
        self.slots: dict[int, int] = {}  # block -> slot, least recently used first

    def positions(self, indices: np.ndarray, fill: Callable[[int, int, np.ndarray, np.ndarray], None]) -> np.ndarray:
        """Where rows `indices` lie in x and y, after fill(start, stop, x, y) read the blocks not held.

        Partition.read_blocks sizes the cache for every block of a step, so the blocks
        replaced are never ones this step needs.
        """
        blocks = indices // self.block_rows
        wanted = np.unique(blocks)
        for block in wanted.tolist():
            slot = self.slots.pop(block, None)
            if slot is None:
                slot = self.free.pop() if self.free else self.slots.pop(next(iter(self.slots)))
                start = block * self.block_rows
                stop = min(start + self.block_rows, self.n)
                at = slot * self.block_rows
                fill(start, stop, self.x[at : at + stop - start], self.y[at : at + stop - start])
            self.slots[block] = slot  # now the most recently used
        slot_of = np.array([self.slots[block] for block in wanted.tolist()], dtype=np.int64)
        return slot_of[np.searchsorted(wanted, blocks)] * self.block_rows + indices - blocks * self.block_rows

    def absent_rows(self, indices: np.ndarray) -> np.ndarray:
        """Every row of the blocks of `indices` that are not held: what `positions` would read."""
        absent = [block for block in np.unique(indices // self.block_rows).tolist() if block not in self.slots]
        ranges = [np.arange(b * self.block_rows, min((b + 1) * self.block_rows, self.n)) for b in absent]
        return np.concatenate(ranges) if ranges else indices[:0]


class SplitReader:
    """Rows of one split (`train` or `val`) for one rank: from memory if the rank's range fits.

    `columns = (c0, c1)` reads only features c0:c1 of each sample (a column hyperslab),
    for partitioning wide samples by columns; samples must then be flat vectors.
    Streamed reads of uncompressed files go straight to the file's bytes (`DirectRows`);
    compressed or checksummed ones through h5py, one hyperslab per contiguous run.
    `blocks = (rows, kept)` (Partition.read_blocks) streams a `chunked` order by whole blocks.
    """

    def __init__(
        self,
        path: str,
        split: str,
        owned: tuple[int, int],
        cache_bytes: float,
        columns: tuple[int, int] | None = None,
        direct: bool = True,
        blocks: tuple[int, int] | None = None,
    ):
        self.path, self.split = path, split
        self.file = h5py.File(path, "r")  # HDF5's small default chunk cache: one-shot and direct reads need no more
        self.x, self.y = self.file[f"{split}/x"], self.file[f"{split}/y"]
        if columns is not None:
            if self.x.ndim != 2:
                raise DataError(
                    f"{path}: partition by columns needs flat samples (feature_shape of one dimension), "
                    f"found {tuple(self.x.shape[1:])}"
                )
            if not 0 <= columns[0] <= columns[1] <= self.x.shape[1]:
                raise DataError(f"{path}: columns {columns} outside the {self.x.shape[1]} features of /{split}/x")
        self.columns = columns
        self.sample_shape = (columns[1] - columns[0],) if columns else tuple(self.x.shape[1:])
        self._cols = (slice(*columns),) if columns else ()
        self.target_shape = tuple(self.y.shape[1:])  # () for class labels and scalar regression targets
        start, stop = owned
        label_bytes = self.y.dtype.itemsize * int(np.prod(self.target_shape))
        row_bytes = self.x.dtype.itemsize * int(np.prod(self.sample_shape)) + label_bytes
        self.cache_start = start
        self.cached = (stop - start) * row_bytes <= cache_bytes
        self.row_bytes = row_bytes
        # The last span read whole (see _in_span): its first row, features and labels.
        self.span_low, self.span_y, self.span_buffer = 0, None, None
        self.span_x = np.empty((0, *self.sample_shape), dtype=self.x.dtype)
        self.direct, self.labels, self.blocks = None, None, None
        if self.cached:
            self.x_cache, self.y_cache = self._read_range(start, stop)
        else:
            if (stop - start) * label_bytes <= LABEL_CACHE_BYTES:
                self.labels = self._read_range(start, stop, labels_only=True)
            if direct:
                self.direct = DirectRows.open(path, self.x, columns)
            if blocks is not None:
                x_row = np.empty(self.sample_shape, dtype=self.x.dtype)
                self.blocks = BlockCache(self.x.shape[0], *blocks, x_row, np.empty(self.target_shape, self.y.dtype))
        if not self.cached and self.direct is None:
            # Streamed through h5py (compressed, checksummed): a large chunk cache lets random reads
            # reuse decompressed chunks.
            self.file.close()
            self.file = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            self.x, self.y = self.file[f"{split}/x"], self.file[f"{split}/y"]

    def _read_range(self, start: int, stop: int, labels_only: bool = False):
        """Rows start:stop as (features, labels), or only their labels."""
        try:
            if labels_only:
                return self.y[start:stop]
            return self.x[(slice(start, stop), *self._cols)], self.y[start:stop]
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read /{self.split} rows {start}:{stop}: {exc}") from None

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows `indices` in the given order, as (features, labels) arrays."""
        if self.cached:
            local = indices - self.cache_start
            return self.x_cache[local], self.y_cache[local]
        if len(indices) == 0:
            empty_y = np.empty((0, *self.target_shape), dtype=self.y.dtype)
            return np.empty((0, *self.sample_shape), dtype=self.x.dtype), empty_y
        if self.blocks is not None:
            local = self.blocks.positions(indices, self._read_into)
            return self.blocks.x[local], self.blocks.y[local]
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        if self._in_span(sorted_indices):
            local = indices - self.span_low
            return self.span_x[local], self.span_y[local]
        x = np.empty((len(indices), *self.sample_shape), dtype=self.x.dtype)
        if self.direct is not None:
            self.direct.read_rows(sorted_indices, x)
        else:
            for start, stop, offset in contiguous_runs(sorted_indices):
                x[offset : offset + stop - start] = self._read_range(start, stop)[0]
        # Undo the sort: row k of the sorted read belongs at position order[k].
        x_out = np.empty_like(x)
        x_out[order] = x
        return x_out, self._labels(indices)

    def will_need(self, indices: np.ndarray) -> None:
        """Have the kernel start reading what read(indices) will read from the file (direct reads only)."""
        if self.direct is None or len(indices) == 0:
            return
        if self.blocks is not None:
            rows = self.blocks.absent_rows(indices)
        else:
            sorted_indices = np.sort(indices)
            low, high = int(sorted_indices[0]), int(sorted_indices[-1]) + 1
            if self._held(low, high):
                return
            rows = np.arange(low, high) if self._worth_a_span(low, high, len(indices)) else sorted_indices
        if len(rows):
            self.direct.will_need(rows)

    def _held(self, low: int, high: int) -> bool:
        return self.span_low <= low and high <= self.span_low + len(self.span_x)

    def _worth_a_span(self, low: int, high: int, rows: int) -> bool:
        return (high - low) * self.row_bytes <= SPAN_BYTES and high - low <= SPAN_DENSITY * rows

    def _in_span(self, sorted_indices: np.ndarray) -> bool:
        """True when the rows lie in the span in memory, reading that span first if it is worth it.

        A `block` window's batches, a validation pass or any nearly contiguous read is
        cheaper as one large sequential read, kept for the next batches of the same span.
        """
        low, high = int(sorted_indices[0]), int(sorted_indices[-1]) + 1
        if self._held(low, high):
            return True
        if not self._worth_a_span(low, high, len(sorted_indices)):
            return False
        if self.span_buffer is None or len(self.span_buffer) < high - low:
            # One buffer, reused: a fresh one per span would pay its page faults every time.
            self.span_buffer = np.empty((high - low, *self.sample_shape), dtype=self.x.dtype)
        self.span_low, self.span_x = low, self.span_buffer[: high - low]
        self.span_y = np.empty((high - low, *self.target_shape), dtype=self.y.dtype)
        self._read_into(low, high, self.span_x, self.span_y)
        return True

    def _read_into(self, start: int, stop: int, x: np.ndarray, y: np.ndarray) -> None:
        """Rows start:stop into x and y: one sequential read (a span, a block)."""
        if self.direct is not None:
            self.direct.read_rows(np.arange(start, stop), x)
        else:
            x[:] = self._read_range(start, stop)[0]
        y[:] = self._labels(np.arange(start, stop))

    def _labels(self, indices: np.ndarray) -> np.ndarray:
        """Labels of rows `indices`: from memory when they fit LABEL_CACHE_BYTES, else read."""
        if self.labels is not None:
            return self.labels[indices - self.cache_start]
        order = np.argsort(indices, kind="stable")
        labels = np.empty((len(indices), *self.target_shape), dtype=self.y.dtype)
        try:
            labels[order] = self.y[indices[order]]  # h5py reads increasing indices in one call
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read /{self.split}/y: {exc}") from None
        return labels

    def close(self) -> None:
        """Release the HDF5 file (and the direct reader's descriptor)."""
        if self.direct is not None:
            self.direct.close()
        self.file.close()


class Loader:
    """Iterates a rank's batches for an epoch, reading ahead in a background thread."""

    def __init__(
        self,
        reader: SplitReader,
        partition: Partition,
        prefetch: int = 2,
        dtype: torch.dtype | None = None,
        read_ahead: int = READ_AHEAD_STEPS,
        device: torch.device = CPU,
    ):
        self.reader, self.partition, self.prefetch = reader, partition, prefetch
        self.dtype = dtype  # the model's input dtype: features are converted here, in the prefetch thread
        self.read_ahead = read_ahead  # steps; 0 for plans made as they go (inference's claimed chunks)
        # A GPU's batches are copied in the prefetch thread on a side stream, while the current step computes.
        self.copier = BatchCopier(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return self.partition.steps_per_epoch()

    def summary(self, world: World) -> dict:
        """How the rows were read, for the run summary (a collective: `cached` only if every rank's share was)."""
        uncached = world.allreduce_sum(np.array([float(not self.reader.cached)]))[0]
        return {"loader": {"cached": not uncached, "prefetch": self.prefetch}}

    def _load(self, plan: StepPlan) -> Batch:
        x, y = self.reader.read(plan.local)
        features = torch.from_numpy(x)
        if self.dtype is not None and features.dtype != self.dtype:
            features = features.to(self.dtype)
        targets = torch.from_numpy(y)
        if targets.is_floating_point() and targets.dtype != torch.float32:  # float64 regression targets in the file
            targets = targets.float()
        batch = Batch(features, targets, plan.global_count, indices=plan.local)
        if self.copier is not None:
            batch.x, batch.y, batch.copied = self.copier.start(batch.x, batch.y)
        return batch

    def _taken(self, batch: Batch) -> Batch:
        """The batch as the step uses it: a GPU batch once the compute stream waits for its copy."""
        if self.copier is not None:
            self.copier.finish(batch.x, batch.y, batch.copied)
        return batch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from `start_step` on; `wait_s` says how long each one was waited for."""
        plans = self.partition.epoch(epoch)[start_step:]
        if self.read_ahead:
            plans = self._read_ahead(plans)
        if self.prefetch == 0:
            for plan in plans:
                began = time.perf_counter()
                batch = self._taken(self._load(plan))
                batch.wait_s = time.perf_counter() - began
                yield batch
            return
        yield from self._prefetched(plans)

    def _read_ahead(self, plans: list[StepPlan]) -> Iterator[StepPlan]:
        """The plans in order; before each, the reader is told the rows `read_ahead` steps on (at the first,
        those of every step up to there), so the disk reads ahead as it does for a stream."""
        for step, plan in enumerate(plans):
            for ahead in plans[step + 1 if step == 0 else step + self.read_ahead : step + self.read_ahead + 1]:
                self.reader.will_need(ahead.local)
            yield plan

    def _prefetched(self, plans: Iterable[StepPlan]) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for plan in plans:
                    if stop.is_set():
                        return
                    ready.put(self._load(plan))
                ready.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                ready.put(exc)

        worker = threading.Thread(target=produce, name="hpcdl-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                began = time.perf_counter()
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                item.wait_s = time.perf_counter() - began
                yield self._taken(item)
        finally:
            stop.set()
            while worker.is_alive():  # drain so a blocked producer can see `stop`
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
