"""The `chunked` sample order: shuffled blocks of rows, rows shuffled within windows of blocks.

The rows are cut into blocks of `block_rows` consecutive rows (a few HDF5 chunks);
the blocks are visited in a random order, and the rows of each window of
`window_blocks` consecutive blocks of that order are shuffled together (a shuffle
buffer). The order depends on (seed, epoch) alone, so global batches cut from it are
the same at any rank count; a streaming reader reads every block whole, once per
epoch, at disk speed. The price is randomness: a batch draws from one window
(window_blocks x block_rows rows), not from the whole split (see `gap_summary`).
"""

from __future__ import annotations

import math
import os

import h5py
import numpy as np

# Default block: the whole number of HDF5 chunks nearest this many bytes, one large sequential read.
BLOCK_BYTES = 1 << 20
# Block rows where the file is not known (a Partition built by hand).
BLOCK_ROWS = 256
# Default window: blocks whose rows are shuffled together (16 MiB of rows with the default blocks).
WINDOW_BLOCKS = 16


def chunked_order(n: int, block_rows: int, window_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Every row of range(n) once: blocks in a random order, rows shuffled within each window of blocks."""
    blocks = rng.permutation(-(-n // block_rows))
    rows = (blocks[:, None] * block_rows + np.arange(block_rows)).ravel()
    window = np.repeat(np.arange(len(blocks)) // window_blocks, block_rows)
    kept = rows < n  # the last block may be short
    rows, window = rows[kept], window[kept]
    # Sorting by (window, random key) shuffles each window's rows and keeps the windows in order.
    return rows[np.lexsort((rng.random(len(rows)), window))]


def default_block_rows(dataset: h5py.Dataset) -> int:
    """Rows of the whole number of the dataset's chunks nearest BLOCK_BYTES, at least one (rows, when not chunked)."""
    row_bytes = dataset.dtype.itemsize * math.prod(dataset.shape[1:])
    chunk_rows = dataset.chunks[0] if dataset.chunks else 1
    chunks = max(1, round(BLOCK_BYTES / max(1, chunk_rows * row_bytes)))
    return chunks * chunk_rows


def block_rows_of(path: str | os.PathLike[str], split: str, block_rows: int) -> int:
    """`block_rows`, or (0) the default for the file's /split/x: the same on every rank, read from the file."""
    if block_rows:
        return block_rows
    with h5py.File(path, "r") as f:
        return default_block_rows(f[f"{split}/x"])


def gap_summary(order: np.ndarray, block_rows: int) -> dict[str, float]:
    """How random an order of range(n) is, beside what a uniform permutation gives.

    `neighbour_gap`: mean distance in the order between rows that are neighbours in the
    file (n/3 for a uniform permutation; about a window's rows / 3 here): data stored
    sorted (by class, by time) is mixed only within a window. `same_block`: the share of
    consecutive samples from the same block of `block_rows` rows (about 1/window_blocks
    here; block_rows/n for a uniform permutation).
    """
    n = len(order)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    neighbour = float(np.abs(np.diff(position)).mean()) if n > 1 else 0.0
    same = float((np.diff(order // block_rows) == 0).mean()) if n > 1 else 0.0
    return {
        "neighbour_gap": round(neighbour, 1),
        "neighbour_gap_uniform": round((n + 1) / 3, 1),
        "same_block": round(same, 4),
        "same_block_uniform": round(min(1.0, block_rows / n), 4),
    }
