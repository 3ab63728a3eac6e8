"""The HDF5 dataset schema, its validation, and a human-readable description.

A dataset file holds one group per split (`/train`, `/val`), each with
`x` (float32, shape (n, *feature_shape)) and `y` (int64, shape (n,)), chunked
along rows, and file attributes `num_classes`, `feature_shape`, `generator`,
`seed` (and optionally `description`). See datasets/README.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from hpcdl.errors import DataError

REQUIRED_ATTRS = ("num_classes", "feature_shape", "generator", "seed")
README = "see datasets/README.md"
# Reads during validation stay below these sizes, whatever the size of the file.
LABEL_READ_BYTES = 8 << 20
SCAN_READ_BYTES = 32 << 20


@dataclass(frozen=True)
class DatasetInfo:
    """What a valid dataset file holds: its classes, per-sample shape, split sizes and attributes."""

    path: str
    num_classes: int
    feature_shape: tuple[int, ...]
    sizes: dict[str, int]
    attrs: dict


def plain(value: Any) -> Any:
    """An HDF5 attribute value as a plain Python value (list, int, float, str)."""
    if isinstance(value, np.ndarray):
        return [plain(item) for item in value.tolist()] if value.dtype.kind in "OS" else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


def row_blocks(dataset: h5py.Dataset, budget_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of at most ~budget_bytes each, aligned to the dataset's chunks."""
    rows_total = dataset.shape[0]
    row_bytes = max(dataset.dtype.itemsize * math.prod(dataset.shape[1:]), 1)
    rows = max(1, budget_bytes // row_bytes)
    if dataset.chunks:
        # Whole chunks per read: a chunk split across two reads would be read (and decompressed) twice.
        chunk = dataset.chunks[0]
        rows = max(chunk, rows // chunk * chunk)
    for start in range(0, rows_total, rows):
        yield start, min(start + rows, rows_total)


def _read(path: str, dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    try:
        return dataset[start:stop]
    except OSError as exc:  # corrupt chunk, failed checksum, truncated file
        raise DataError(f"{path}: cannot read '{dataset.name}' rows {start}:{stop} ({exc}); rebuild the file") from None


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise DataError(f"{path}: file does not exist; build one with `python -m hpcdl data make` ({README})")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not an HDF5 file; give the path of a .h5 file")
    if not h5py.is_hdf5(path):
        raise DataError(f"{path}: not an HDF5 file; convert your data to the hpcdl schema ({README})")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open the HDF5 file ({exc}); check it is complete and readable") from None


def _check_attrs(path: str, file: h5py.File) -> tuple[int, tuple[int, ...], dict]:
    attrs = {key: plain(file.attrs[key]) for key in file.attrs}
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        names = ", ".join(f"'{key}'" for key in missing)
        raise DataError(f"{path}: missing file attribute {names} (expected {', '.join(REQUIRED_ATTRS)}; {README})")
    num_classes = attrs["num_classes"]
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise DataError(f"{path}: attribute num_classes must be an integer >= 2, found {num_classes!r}")
    shape = attrs["feature_shape"]
    shape = [shape] if isinstance(shape, int) else shape
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise DataError(
            f"{path}: attribute feature_shape must be a list of positive integers "
            f"(e.g. [64] or [1, 28, 28]), "
            f"found {attrs['feature_shape']!r}"
        )
    if not isinstance(attrs["seed"], int):
        raise DataError(f"{path}: attribute seed must be an integer, found {attrs['seed']!r}")
    if not isinstance(attrs["generator"], str):
        raise DataError(f"{path}: attribute generator must be a string, found {attrs['generator']!r}")
    return num_classes, tuple(shape), attrs


def _datasets(path: str, file: h5py.File, splits: tuple[str, ...]) -> dict[str, h5py.Dataset]:
    names = [f"/{split}/{part}" for split in splits for part in ("x", "y")]
    found = {}
    for name in names:
        try:
            found[name] = file.get(name)
        except (KeyError, TypeError, ValueError):  # e.g. /train exists but is a dataset, not a group
            found[name] = None
        if not isinstance(found[name], h5py.Dataset):
            raise DataError(f"{path}: missing dataset '{name}' (expected {', '.join(names)}; {README})")
    return found


def _check_split(path: str, x: h5py.Dataset, y: h5py.Dataset, feature_shape: tuple[int, ...]) -> int:
    if x.dtype != np.float32:
        raise DataError(f"{path}: '{x.name}' has dtype {x.dtype}; x must be float32 (store x.astype('float32'))")
    if y.dtype != np.int64:
        raise DataError(f"{path}: '{y.name}' has dtype {y.dtype}; y must be int64 (store y.astype('int64'))")
    if x.ndim == 0:
        raise DataError(f"{path}: '{x.name}' is a scalar; x must have shape (n, *feature_shape)")
    if y.ndim != 1:
        raise DataError(f"{path}: '{y.name}' has shape {y.shape}; y must be one label per sample, shape (n,)")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{path}: '{x.name}' has {x.shape[0]} samples but '{y.name}' has {y.shape[0]}; "
            "x and y need one label per sample"
        )
    if tuple(x.shape[1:]) != feature_shape:
        raise DataError(
            f"{path}: '{x.name}' has per-sample shape {tuple(x.shape[1:])} but the file attribute "
            f"feature_shape is {feature_shape}; make them agree"
        )
    if x.shape[0] == 0:
        raise DataError(f"{path}: split '{x.parent.name}' is empty (0 samples); every split needs samples")
    return int(x.shape[0])


def _check_labels(path: str, y: h5py.Dataset, num_classes: int) -> None:
    low, high, first_bad = None, None, None
    for start, stop in row_blocks(y, LABEL_READ_BYTES):
        labels = _read(path, y, start, stop)
        block_low, block_high = int(labels.min()), int(labels.max())
        low = block_low if low is None else min(low, block_low)
        high = block_high if high is None else max(high, block_high)
        if first_bad is None and (block_low < 0 or block_high >= num_classes):
            offset = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
            first_bad = (start + offset, int(labels[offset]))
    if first_bad is not None:
        index, value = first_bad
        raise DataError(
            f"{path}: '{y.name}' has labels outside 0..{num_classes - 1} (min {low}, max {high}; "
            f"first at index {index}: {value}); labels must be class indices below num_classes={num_classes}"
        )


def _scan_features(path: str, x: h5py.Dataset) -> None:
    for start, stop in row_blocks(x, SCAN_READ_BYTES):
        block = _read(path, x, start, stop)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not finite.all():
            offset = int(np.flatnonzero(~finite)[0])
            kind = "NaN" if np.isnan(block[offset]).any() else "Inf"
            raise DataError(
                f"{path}: '{x.name}' has NaN/Inf values: first {kind} in sample {start + offset} "
                f"of split '{x.parent.name}'; fix or drop those samples"
            )


def validate(path: str, splits: tuple[str, ...] = ("train", "val"), scan: bool = False) -> DatasetInfo:
    """Check a dataset file against the schema; raise DataError naming the file and what to do."""
    path = os.fspath(path)
    with _open(path) as file:
        num_classes, feature_shape, attrs = _check_attrs(path, file)
        datasets = _datasets(path, file, splits)
        sizes = {}
        for split in splits:
            x, y = datasets[f"/{split}/x"], datasets[f"/{split}/y"]
            sizes[split] = _check_split(path, x, y, feature_shape)
            _check_labels(path, y, num_classes)
            if scan:
                _scan_features(path, x)
    return DatasetInfo(path, num_classes, feature_shape, sizes, attrs)


def _storage(name: str, dataset: h5py.Dataset) -> str:
    compression = dataset.compression or "none"
    if dataset.compression_opts is not None:
        compression += f" ({dataset.compression_opts})"
    return (
        f"    {name}  {dataset.dtype} {dataset.shape}, chunks {dataset.chunks}, compression {compression}, "
        f"fletcher32 {'yes' if dataset.fletcher32 else 'no'}, {dataset.nbytes / 1e6:.2f} MB "
        f"({dataset.id.get_storage_size() / 1e6:.2f} MB on disk)"
    )


def describe(info: DatasetInfo) -> str:
    """A multi-line, human-readable summary of a validated dataset file."""
    extra = {key: value for key, value in info.attrs.items() if key not in ("num_classes", "feature_shape")}
    lines = [
        info.path,
        f"  classes        {info.num_classes}",
        f"  feature shape  {info.feature_shape}",
        *(f"  {key:<14} {value!r}" for key, value in sorted(extra.items())),
    ]
    with _open(info.path) as file:
        for split, size in info.sizes.items():
            lines.append(f"  /{split}  {size:,} samples")
            lines += [_storage(part, file[f"{split}/{part}"]) for part in ("x", "y")]
    return "\n".join(lines)
