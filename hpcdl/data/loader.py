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

from hpcdl.data.partition import Partition, StepPlan
from hpcdl.errors import DataError

# HDF5's per-dataset chunk cache: large enough that random reads reuse decompressed chunks.
CHUNK_CACHE_BYTES = 64 << 20


@dataclass
class Batch:
    """One rank's share of one global batch."""

    x: torch.Tensor
    y: torch.Tensor
    global_count: int
    wait_s: float = 0.0  # time the training step waited for this batch


def contiguous_runs(sorted_indices: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, offset) runs of consecutive indices, so each run is one hyperslab read."""
    if len(sorted_indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(sorted_indices)]))
    return [(int(sorted_indices[a]), int(sorted_indices[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


class SplitReader:
    """Rows of one split (`train` or `val`) for one rank: from memory if the rank's range fits."""

    def __init__(self, path: str, split: str, owned: tuple[int, int], cache_bytes: float):
        self.path, self.split = path, split
        self.file = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
        self.x, self.y = self.file[f"{split}/x"], self.file[f"{split}/y"]
        start, stop = owned
        row_bytes = self.x.dtype.itemsize * int(np.prod(self.x.shape[1:])) + self.y.dtype.itemsize
        self.cache_start = start
        self.cached = (stop - start) * row_bytes <= cache_bytes
        if self.cached:
            self.x_cache, self.y_cache = self._read_range(start, stop)

    def _read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self.x[start:stop], self.y[start:stop]
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read /{self.split} rows {start}:{stop}: {exc}") from None

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows `indices` in the given order, as (features, labels) arrays."""
        if self.cached:
            local = indices - self.cache_start
            return self.x_cache[local], self.y_cache[local]
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        x = np.empty((len(indices), *self.x.shape[1:]), dtype=self.x.dtype)
        y = np.empty(len(indices), dtype=self.y.dtype)
        for start, stop, offset in contiguous_runs(sorted_indices):
            x[offset : offset + stop - start], y[offset : offset + stop - start] = self._read_range(start, stop)
        # Undo the sort: row k of the sorted read belongs at position order[k].
        x_out, y_out = np.empty_like(x), np.empty_like(y)
        x_out[order], y_out[order] = x, y
        return x_out, y_out

    def close(self) -> None:
        """Release the HDF5 file."""
        self.file.close()


class Loader:
    """Iterates a rank's batches for an epoch, reading ahead in a background thread."""

    def __init__(self, reader: SplitReader, partition: Partition, prefetch: int = 2):
        self.reader, self.partition, self.prefetch = reader, partition, prefetch

    def __len__(self) -> int:
        return self.partition.steps_per_epoch()

    def _load(self, plan: StepPlan) -> Batch:
        x, y = self.reader.read(plan.local)
        return Batch(torch.from_numpy(x), torch.from_numpy(y), plan.global_count)

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
