"""Reading a rank's batches from HDF5: cached or streamed, coalesced reads, prefetch."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from hpcdl.data.direct import DirectRows
from hpcdl.data.partition import Partition, StepPlan
from hpcdl.errors import DataError

# HDF5's per-dataset chunk cache: large enough that random reads reuse decompressed chunks.
CHUNK_CACHE_BYTES = 64 << 20
# A streaming reader keeps all labels (or regression targets) of its rows in memory up to this size.
LABEL_CACHE_BYTES = 64 << 20
# A streamed batch is read as one sequential span (kept for the next batches) when the span
# is at most SPAN_DENSITY times its rows and at most SPAN_BYTES: a `block` window, a val pass.
SPAN_DENSITY, SPAN_BYTES = 16, 32 << 20


@dataclass
class Batch:
    """One rank's share of one global batch."""

    x: torch.Tensor
    y: torch.Tensor  # int64 class labels (n,), or float32 regression targets (n, *target_shape)
    global_count: int
    wait_s: float = 0.0  # time the training step waited for this batch
    indices: np.ndarray | None = None  # the split's rows it holds, in order (None for a batch built by hand)


def contiguous_runs(sorted_indices: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, offset) runs of consecutive indices, so each run is one hyperslab read."""
    if len(sorted_indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(sorted_indices)]))
    return [(int(sorted_indices[a]), int(sorted_indices[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


class SplitReader:
    """Rows of one split (`train` or `val`) for one rank: from memory if the rank's range fits.

    `columns = (c0, c1)` reads only features c0:c1 of each sample (a column hyperslab),
    for partitioning wide samples by columns; samples must then be flat vectors.
    Streamed reads of uncompressed files go straight to the file's bytes (`DirectRows`);
    compressed or checksummed ones through h5py, one hyperslab per contiguous run.
    """

    def __init__(
        self,
        path: str,
        split: str,
        owned: tuple[int, int],
        cache_bytes: float,
        columns: tuple[int, int] | None = None,
        direct: bool = True,
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
        self.direct, self.labels = None, None
        if self.cached:
            self.x_cache, self.y_cache = self._read_range(start, stop)
        else:
            if (stop - start) * label_bytes <= LABEL_CACHE_BYTES:
                self.labels = self._read_range(start, stop, labels_only=True)
            if direct:
                self.direct = DirectRows.open(path, self.x, columns)
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

    def _in_span(self, sorted_indices: np.ndarray) -> bool:
        """True when the rows lie in the span in memory, reading that span first if it is worth it.

        A `block` window's batches, a validation pass or any nearly contiguous read is
        cheaper as one large sequential read, kept for the next batches of the same span.
        """
        low, high = int(sorted_indices[0]), int(sorted_indices[-1]) + 1
        if self.span_low <= low and high <= self.span_low + len(self.span_x):
            return True
        if (high - low) * self.row_bytes > SPAN_BYTES or high - low > SPAN_DENSITY * len(sorted_indices):
            return False
        if self.span_buffer is None or len(self.span_buffer) < high - low:
            # One buffer, reused: a fresh one per span would pay its page faults every time.
            self.span_buffer = np.empty((high - low, *self.sample_shape), dtype=self.x.dtype)
        self.span_low, self.span_x = low, self.span_buffer[: high - low]
        if self.direct is not None:
            self.direct.read_rows(np.arange(low, high), self.span_x)
        else:
            self.span_x[:] = self._read_range(low, high)[0]
        self.span_y = self._labels(np.arange(low, high))
        return True

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

    def __init__(self, reader: SplitReader, partition: Partition, prefetch: int = 2, dtype: torch.dtype | None = None):
        self.reader, self.partition, self.prefetch = reader, partition, prefetch
        self.dtype = dtype  # the model's input dtype: features are converted here, in the prefetch thread

    def __len__(self) -> int:
        return self.partition.steps_per_epoch()

    def _load(self, plan: StepPlan) -> Batch:
        x, y = self.reader.read(plan.local)
        features = torch.from_numpy(x)
        if self.dtype is not None and features.dtype != self.dtype:
            features = features.to(self.dtype)
        targets = torch.from_numpy(y)
        if targets.is_floating_point() and targets.dtype != torch.float32:  # float64 regression targets in the file
            targets = targets.float()
        return Batch(features, targets, plan.global_count, indices=plan.local)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from `start_step` on; `wait_s` says how long each one was waited for."""
        plans = self.partition.epoch(epoch)[start_step:]
        if self.prefetch == 0:
            for plan in plans:
                began = time.perf_counter()
                batch = self._load(plan)
                batch.wait_s = time.perf_counter() - began
                yield batch
            return
        yield from self._prefetched(plans)

    def _prefetched(self, plans: list[StepPlan]) -> Iterator[Batch]:
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
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # drain so a blocked producer can see `stop`
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
