"""Direct reads of an uncompressed HDF5 dataset: rows fetched with pread from the file's own bytes.

HDF5 stores an unfiltered chunk as the raw rows it holds, at a file offset that
`H5Dchunk_iter` reports. Knowing every chunk's offset once, a batch's rows are
read with one `preadv` per contiguous run inside a chunk, straight into the batch
array: no HDF5 call (and no h5py lock) per read, and the GIL is released while
the kernel copies, so a prefetch thread overlaps fully with the training step.
Anything else (compression, checksums, shuffle, a foreign byte order, chunks that
split a row, unallocated chunks) returns None from `open`, and h5py reads it.
"""

from __future__ import annotations

import os
import sys

import h5py
import numpy as np

from hpcdl.errors import DataError

MAX_GAP = 64 << 10  # bytes between two wanted segments still read in the same call
MAX_BUFFERS = 512  # buffers per preadv (the kernel allows IOV_MAX = 1024)


class DirectRows:
    """Row reader of one uncompressed HDF5 dataset by file offsets; `open` says if it applies."""

    def __init__(self, path: str, offsets: np.ndarray, chunk_rows: int, row_bytes: int, columns, itemsize: int):
        self.path, self.offsets, self.chunk_rows, self.row_bytes = path, offsets, chunk_rows, row_bytes
        self.column_bytes = (columns[0] * itemsize, (columns[1] - columns[0]) * itemsize) if columns else None
        self.fd = os.open(path, os.O_RDONLY)
        self.scratch = np.empty(MAX_GAP, dtype=np.uint8)  # where the bytes of small gaps go

    @classmethod
    def open(cls, path: str, dataset: h5py.Dataset, columns: tuple[int, int] | None = None) -> DirectRows | None:
        """A direct reader of `dataset` (features `columns` of each row), or None when h5py must read it."""
        dtype = dataset.dtype
        native = dtype.byteorder in ("=", "|") or (dtype.byteorder == "<") == (sys.byteorder == "little")
        if dataset.id.get_create_plist().get_nfilters() or not native or dataset.shape[0] == 0:
            return None
        row_bytes = dtype.itemsize * int(np.prod(dataset.shape[1:]))
        if dataset.chunks is None:
            offset = dataset.id.get_offset()
            if offset is None:
                return None
            return cls(path, np.array([offset], dtype=np.int64), dataset.shape[0], row_bytes, columns, dtype.itemsize)
        if tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
            return None  # chunks that split a row: h5py reassembles them
        chunk_rows = dataset.chunks[0]
        offsets = np.full(-(-dataset.shape[0] // chunk_rows), -1, dtype=np.int64)

        def found(info) -> None:
            offsets[info.chunk_offset[0] // chunk_rows] = info.byte_offset

        try:
            dataset.id.chunk_iter(found)
        except (AttributeError, RuntimeError, ValueError):  # an HDF5 without H5Dchunk_iter
            return None
        if (offsets < 0).any():
            return None  # a chunk never written: HDF5 would return the fill value
        return cls(path, offsets, chunk_rows, row_bytes, columns, dtype.itemsize)

    def _positions(self, indices: np.ndarray) -> np.ndarray:
        """The file offset of each row's first byte."""
        chunk = indices // self.chunk_rows
        return self.offsets[chunk] + (indices - chunk * self.chunk_rows) * self.row_bytes

    def will_need(self, indices: np.ndarray) -> None:
        """Have the kernel start reading rows `indices` into the page cache now, for a read_rows later.

        posix_fadvise(WILLNEED) returns once the reads are queued: the disk works on the
        next steps' rows while this step's are copied and used, as it does for a stream.
        Rows closer than MAX_GAP are asked for as one range.
        """
        starts = np.sort(self._positions(indices))
        ends = starts + self.row_bytes
        breaks = np.flatnonzero(starts[1:] - ends[:-1] > MAX_GAP) + 1
        firsts, lasts = starts[[0, *breaks.tolist()]], ends[[*(breaks - 1).tolist(), len(ends) - 1]]
        for first, last in zip(firsts.tolist(), lasts.tolist()):
            os.posix_fadvise(self.fd, first, last - first, os.POSIX_FADV_WILLNEED)

    def read_rows(self, sorted_indices: np.ndarray, out: np.ndarray) -> None:
        """Fill out[k] with row sorted_indices[k], in as few `preadv` calls as the file layout allows."""
        positions = self._positions(sorted_indices)
        if self.column_bytes is not None:
            skip, width = self.column_bytes
            segments = [(out[k], p, width) for k, p in enumerate((positions + skip).tolist())]
        else:
            # Rows adjacent in the file (not only in index) are one segment.
            breaks = np.flatnonzero(np.diff(positions) != self.row_bytes) + 1
            starts = [0, *breaks.tolist()]
            stops = [*breaks.tolist(), len(sorted_indices)]
            firsts = positions[starts].tolist()
            segments = [(out[a:b], p, (b - a) * self.row_bytes) for a, b, p in zip(starts, stops, firsts)]
        self._read_segments(segments)

    def _read_segments(self, segments: list[tuple[np.ndarray, int, int]]) -> None:
        """One `preadv` for each group of segments separated by small gaps (read into a scratch buffer).

        The gaps are other columns of the same rows, or the labels' chunks that sit between
        two feature chunks: reading a few extra bytes beats another system call and lets
        the kernel see one large sequential read.
        """
        group: list = []
        group_start = group_end = 0
        for target, position, size in segments:
            gap = position - group_end
            if group and (0 <= gap <= MAX_GAP) and len(group) < MAX_BUFFERS:
                if gap:
                    group.append(self.scratch[:gap])
            else:
                if group:
                    self._pread(group, group_start, group_end - group_start)
                group, group_start = [], position
            group.append(target)
            group_end = position + size
        if group:
            self._pread(group, group_start, group_end - group_start)

    def _pread(self, buffers: list, position: int, want: int) -> None:
        got = os.preadv(self.fd, buffers, position)
        if got != want:
            raise DataError(f"{self.path}: file ends early at byte {position + got} (truncated?); rebuild the file")

    def close(self) -> None:
        """Close the file descriptor."""
        os.close(self.fd)
