"""The HDF5 dataset schema, its validation, and a human-readable description.

A dataset file holds one group per split (`/train`, `/val`), each with
`x` (float32, shape (n, *feature_shape)) and `y`, chunked along rows, and file
attributes `feature_shape`, `generator`, `seed` (and optionally `description`).
The optional attribute `task` says what `y` is: "classification" (the default)
has int64 class indices, shape (n,), below the attribute `num_classes`;
"regression" has float targets, shape (n, *target_shape). See datasets/README.md.
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

SPLITS = ("train", "val")
TASKS = ("classification", "regression")
REQUIRED_ATTRS = {
    "classification": ("num_classes", "feature_shape", "generator", "seed"),
    "regression": ("feature_shape", "generator", "seed"),
}
TARGET_DTYPES = (np.float32, np.float64)  # float32 expected; float64 accepted, the loader gives float32
README = "see datasets/README.md"
# Reads during validation stay below these sizes, whatever the size of the file.
LABEL_READ_BYTES = 8 << 20
SCAN_READ_BYTES = 32 << 20
# /val is scanned for NaN/Inf at every start up to this size (a NaN there would only show as val_loss=nan);
# a larger /val is left to `hpcdl data info FILE --scan` (or data.scan), with a note.
VAL_SCAN_BYTES = 256 << 20
# A warning lists at most this many class indices.
LISTED_CLASSES = 10
# More than half of num_classes, and more than this many, unused by the train labels looks like a wrong num_classes
# rather than rare classes: the warning then says how to set it.
UNUSED_CLASSES = 4
# Features beyond this in magnitude make a float32 model's first logits or predictions about as large: its softmax
# saturates and a squared error passes 1e12 (overflowing float32 from ~1e19), so the first loss means nothing.
LARGE_FEATURE = 1e6
# The first rows of /train/x read at every start to see the features' range (a sample: the scan reads them all).
RANGE_SAMPLE_BYTES = 4 << 20


@dataclass(frozen=True)
class TargetStats:
    """Mean, standard deviation, minimum and maximum over every element of a split's regression targets."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    low: float = math.inf
    high: float = -math.inf

    def add(self, block: np.ndarray) -> TargetStats:
        """These statistics with a block of targets added (Chan et al.'s merge: no precision lost to large sums)."""
        values = block.astype(np.float64).reshape(-1)
        if not len(values):
            return self
        count = self.count + len(values)
        mean = float(values.mean())
        delta = mean - self.mean
        return TargetStats(
            count,
            self.mean + delta * len(values) / count,
            self.m2 + float(((values - mean) ** 2).sum()) + delta**2 * self.count * len(values) / count,
            min(self.low, float(values.min())),
            max(self.high, float(values.max())),
        )

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return math.sqrt(self.m2 / self.count) if self.count else math.nan


@dataclass(frozen=True)
class DatasetInfo:
    """What a valid dataset file holds: its task, classes or target shape, per-sample shape, split sizes, attributes."""

    path: str
    num_classes: int  # 0 for regression: it has no classes
    feature_shape: tuple[int, ...]
    sizes: dict[str, int]
    attrs: dict
    warnings: tuple[str, ...] = ()  # what is valid but likely a mistake (e.g. classes no label uses), said at start
    task: str = "classification"
    target_shape: tuple[int, ...] = ()  # one sample's target (regression); () for classification and scalar targets
    target_stats: TargetStats | None = None  # the train targets' (regression, when /train was validated)

    @property
    def outputs(self) -> int:
        """How many outputs the model needs: one per class, or one per target element."""
        return self.num_classes if self.task == "classification" else math.prod(self.target_shape)


def plain(value: Any) -> Any:
    """An HDF5 attribute value as a plain Python value (list, int, float, str)."""
    if isinstance(value, np.ndarray):
        return [plain(item) for item in value.tolist()] if value.dtype.kind in "OS" else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


def _rows_within(dataset: h5py.Dataset, budget_bytes: int) -> int:
    """How many of the dataset's rows fit in budget_bytes (at least one)."""
    row_bytes = max(dataset.dtype.itemsize * math.prod(dataset.shape[1:]), 1)
    return max(1, budget_bytes // row_bytes)


def row_blocks(dataset: h5py.Dataset, budget_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of at most ~budget_bytes each, aligned to the dataset's chunks."""
    rows_total = dataset.shape[0]
    rows = _rows_within(dataset, budget_bytes)
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


def _check_task(path: str, attrs: dict) -> str:
    """The file's task: its `task` attribute, "classification" when there is none."""
    task = attrs.get("task", "classification")
    if task not in TASKS:
        raise DataError(
            f"{path}: attribute task must be 'classification' or 'regression', found {task!r}; "
            "leave it out for classification"
        )
    return task


def _check_attrs(path: str, file: h5py.File) -> tuple[str, int, tuple[int, ...], dict]:
    """(task, num_classes (0 for regression), feature_shape, every attribute as a plain value)."""
    attrs = {key: plain(file.attrs[key]) for key in file.attrs}
    task = _check_task(path, attrs)
    required = REQUIRED_ATTRS[task]
    missing = [key for key in required if key not in attrs]
    if missing:
        names = ", ".join(f"'{key}'" for key in missing)
        raise DataError(f"{path}: missing file attribute {names} (expected {', '.join(required)}; {README})")
    num_classes = attrs["num_classes"] if task == "classification" else 0  # regression ignores the attribute
    if task == "classification" and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2
    ):
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
    return task, num_classes, tuple(shape), attrs


def _datasets(path: str, file: h5py.File, splits: tuple[str, ...]) -> dict[str, h5py.Dataset]:
    names = [f"/{split}/{part}" for split in splits for part in ("x", "y")]
    found = {}
    for name in names:
        try:
            found[name] = file.get(name)
        except (KeyError, TypeError, ValueError):  # e.g. /train exists but is a dataset, not a group
            found[name] = None
        if not isinstance(found[name], h5py.Dataset):
            _check_external_links(path, file, name)
            raise DataError(f"{path}: missing dataset '{name}' (expected {', '.join(names)}; {README})")
    return found


def _opens(file: h5py.File, name: str) -> bool:
    try:
        return file.get(name) is not None
    except (KeyError, OSError, TypeError, ValueError):
        return False


def _check_external_links(path: str, file: h5py.File, name: str) -> None:
    """Name the external link on the way to `name` that cannot be followed, if one is why `name` is missing."""
    parts = name.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        where = "/" + "/".join(parts[:depth])
        try:
            link = file.get(where, getlink=True)
        except (KeyError, OSError, TypeError, ValueError):
            return
        if isinstance(link, h5py.ExternalLink) and not _opens(file, where):
            # HDF5 looks for a link's file beside the linking file, then as named (from the working directory).
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), link.filename)
            if not (os.path.exists(beside) or os.path.exists(link.filename)):
                raise DataError(
                    f"{path}: '{where}' is an external link to missing file {link.filename} (looked for beside "
                    "the file and in the working directory); put it there or store the data in this file"
                )
            raise DataError(
                f"{path}: '{where}' is an external link to '{link.path}' in {link.filename}, which cannot be "
                "opened; check that object exists in that file"
            )


def _check_external_storage(path: str, dataset: h5py.Dataset) -> None:
    """A dataset whose raw data lives in other files (HDF5 external storage) names the first missing one."""
    # Read as HDF5 does: each name under HDF5_EXTFILE_PREFIX ("${ORIGIN}": the file's folder), else the working
    # directory (h5py sets no prefix of its own).
    prefix = os.environ.get("HDF5_EXTFILE_PREFIX", "").replace("${ORIGIN}", os.path.dirname(os.path.abspath(path)))
    for name, _offset, _size in dataset.external or ():
        if not os.path.exists(os.path.join(prefix, name)):
            where = prefix or f"the working directory {os.getcwd()}"
            raise DataError(
                f"{path}: '{dataset.name}' keeps its data in external file {name}, which is missing (looked for "
                f"in {where}); put it there or store the data in this file"
            )


def _check_y(path: str, y: h5py.Dataset, task: str) -> None:
    """y's dtype and rank fit the task: int64 labels of shape (n,), or float targets of shape (n, *target_shape)."""
    if task == "classification":
        if y.dtype != np.int64:
            raise DataError(f"{path}: '{y.name}' has dtype {y.dtype}; y must be int64 (store y.astype('int64'))")
        if y.ndim != 1:
            raise DataError(f"{path}: '{y.name}' has shape {y.shape}; y must be one label per sample, shape (n,)")
    else:
        if y.dtype not in TARGET_DTYPES:
            raise DataError(
                f"{path}: '{y.name}' has dtype {y.dtype}; regression targets must be float32 "
                "(store y.astype('float32'))"
            )
        if y.ndim == 0:
            raise DataError(f"{path}: '{y.name}' is a scalar; y must have shape (n, *target_shape)")


def _check_split(path: str, x: h5py.Dataset, y: h5py.Dataset, feature_shape: tuple[int, ...], task: str) -> int:
    if x.dtype != np.float32:
        raise DataError(f"{path}: '{x.name}' has dtype {x.dtype}; x must be float32 (store x.astype('float32'))")
    _check_y(path, y, task)
    if x.ndim == 0:
        raise DataError(f"{path}: '{x.name}' is a scalar; x must have shape (n, *feature_shape)")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{path}: '{x.name}' has {x.shape[0]} samples but '{y.name}' has {y.shape[0]}; "
            "x and y need one row per sample"
        )
    if tuple(x.shape[1:]) != feature_shape:
        raise DataError(
            f"{path}: '{x.name}' has per-sample shape {tuple(x.shape[1:])} but the file attribute "
            f"feature_shape is {feature_shape}; make them agree"
        )
    if x.shape[0] == 0:
        raise DataError(f"{path}: split '{x.parent.name}' is empty (0 samples); every split needs samples")
    return int(x.shape[0])


def _check_labels(path: str, y: h5py.Dataset, num_classes: int) -> np.ndarray:
    """Labels in 0..num_classes-1, else a DataError naming the first bad one; returns the count of each class."""
    low, high, first_bad = None, None, None
    counts = np.zeros(num_classes, dtype=np.int64)
    for start, stop in row_blocks(y, LABEL_READ_BYTES):
        labels = _read(path, y, start, stop)
        block_low, block_high = int(labels.min()), int(labels.max())
        low = block_low if low is None else min(low, block_low)
        high = block_high if high is None else max(high, block_high)
        if first_bad is None and (block_low < 0 or block_high >= num_classes):
            offset = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
            first_bad = (start + offset, int(labels[offset]))
        if first_bad is None:  # counted only while every label is a class (an error follows otherwise)
            counts += np.bincount(labels, minlength=num_classes)
    if first_bad is not None:
        index, value = first_bad
        raise DataError(
            f"{path}: '{y.name}' has labels outside 0..{num_classes - 1} (min {low}, max {high}; "
            f"first at index {index}: {value}); labels must be class indices below num_classes={num_classes}"
        )
    return counts


def _check_targets(path: str, y: h5py.Dataset) -> TargetStats:
    """Regression targets all finite, else a DataError naming the first bad row; returns their statistics."""
    stats = TargetStats()
    for start, stop in row_blocks(y, LABEL_READ_BYTES):
        targets = _read(path, y, start, stop)
        finite = np.isfinite(targets).reshape(len(targets), -1).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            elements = np.ravel(targets[row])
            value = elements[~np.isfinite(elements)][0]
            raise DataError(
                f"{path}: '{y.name}' has a non-finite target in row {start + row} ({value}); "
                "regression targets must be finite: fix or drop that sample"
            )
        stats = stats.add(targets)
    return stats


def _listed(classes: np.ndarray) -> str:
    shown = ", ".join(map(str, classes[:LISTED_CLASSES]))
    return shown + (f", ... ({len(classes) - LISTED_CLASSES} more)" if len(classes) > LISTED_CLASSES else "")


def _unused_classes_warning(path: str, split: str, counts: np.ndarray) -> list[str]:
    """A warning when the split's labels leave classes unused: the model still gets an output for each; when far
    more classes are declared than used, what to do if that is not meant."""
    used, unused = np.flatnonzero(counts), np.flatnonzero(counts == 0)
    if not len(unused):
        return []
    declared = len(counts)
    which = f"({_listed(used)})" if len(used) <= len(unused) else f"(none of {_listed(unused)})"
    warning = f"{path}: labels of /{split} use {len(used)} of num_classes = {declared} {which}; "
    if len(unused) <= max(len(used), UNUSED_CLASSES):
        return [warning + f"the model will have {declared} outputs"]
    needed = int(used[-1]) + 1
    fix = (
        f"`hpcdl data convert ... --classes {needed}` (or set its num_classes attribute to {needed})"
        if needed < declared
        else f"its labels renumbered 0..{len(used) - 1}"
    )
    return [
        warning + f"the model gets {declared} outputs and {len(unused)} of them (more than half, more than "
        f"{UNUSED_CLASSES}) are for classes no sample has; if that is not meant, rebuild the file with {fix}"
    ]


def _large_features_warning(path: str, x: h5py.Dataset) -> list[str]:
    """A warning when the first rows of `x` (a bounded sample) hold features so large that a float32 model's first
    loss overflows or means nothing."""
    rows = min(x.shape[0], _rows_within(x, RANGE_SAMPLE_BYTES))
    sample = _read(path, x, 0, rows)
    finite = sample[np.isfinite(sample)]  # NaN and Inf are the scan's to name
    if not finite.size or float(np.abs(finite).max()) <= LARGE_FEATURE:
        return []
    low, high = float(finite.min()), float(finite.max())
    return [
        f"{path}: features of '{x.name}' reach {max(-low, high):.3g} (range [{low:.3g}, {high:.3g}] in its first "
        f"{rows:,} rows; more than {LARGE_FEATURE:.0e} warns): a float32 model's first loss may overflow or mean "
        "nothing; scale them (e.g. standardize each feature) and rebuild the file"
    ]


def _scan_features(path: str, x: h5py.Dataset) -> None:
    """A DataError naming the split, sample and value of the first NaN or Inf in `x`."""
    for start, stop in row_blocks(x, SCAN_READ_BYTES):
        block = _read(path, x, start, stop)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not finite.all():
            offset = int(np.flatnonzero(~finite)[0])
            row = block[offset]
            feature = np.unravel_index(int(np.flatnonzero(~np.isfinite(row))[0]), row.shape)
            value = float(row[feature])
            index = ", ".join(map(str, (start + offset, *map(int, feature))))
            raise DataError(
                f"{path}: '{x.name}' has NaN/Inf values: first {'NaN' if math.isnan(value) else 'Inf'} in sample "
                f"{start + offset} of split '{x.parent.name}' (x[{index}] = {value}); fix or drop those samples "
                f"(`hpcdl data info {path} --scan` checks every split)"
            )


def _scan_val(path: str, x: h5py.Dataset) -> list[str]:
    """/val's features scanned for NaN/Inf when small enough, else a note that they were not."""
    if x.nbytes > VAL_SCAN_BYTES:
        return [
            f"/val/x ({x.nbytes / 2**20:,.0f} MiB) was not scanned for NaN/Inf (only up to {VAL_SCAN_BYTES >> 20} "
            f"MiB is, at every start); scan the file once with `hpcdl data info {path} --scan`"
        ]
    _scan_features(path, x)
    return []


def validate(path: str | os.PathLike[str], splits: tuple[str, ...] = SPLITS, scan: bool = False) -> DatasetInfo:
    """Check a dataset file against the schema; raise DataError naming the file and what to do.

    Features are scanned for NaN/Inf: /val's always (up to VAL_SCAN_BYTES), every split's with `scan`.
    What is valid but likely a mistake comes back in `warnings`.
    """
    path = os.fspath(path)
    warnings: list[str] = []
    target_shapes: dict[str, tuple[int, ...]] = {}
    target_stats: dict[str, TargetStats] = {}
    with _open(path) as file:
        task, num_classes, feature_shape, attrs = _check_attrs(path, file)
        datasets = _datasets(path, file, splits)
        sizes = {}
        for split in splits:
            x, y = datasets[f"/{split}/x"], datasets[f"/{split}/y"]
            sizes[split] = _check_split(path, x, y, feature_shape, task)
            _check_external_storage(path, x)
            _check_external_storage(path, y)
            if task == "classification":
                counts = _check_labels(path, y, num_classes)
                if split == "train":
                    warnings += _unused_classes_warning(path, split, counts)
            else:
                target_shapes[split] = tuple(y.shape[1:])
                target_stats[split] = _check_targets(path, y)
            if split == "train":
                warnings += _large_features_warning(path, x)
            if scan:
                _scan_features(path, x)
            elif split == "val":
                warnings += _scan_val(path, x)
    target_shape = _agreed_target_shape(path, target_shapes)
    return DatasetInfo(
        path, num_classes, feature_shape, sizes, attrs, tuple(warnings), task, target_shape, target_stats.get("train")
    )


def _agreed_target_shape(path: str, target_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The one per-sample target shape of the splits (() when there are none: classification)."""
    shapes = set(target_shapes.values())
    if len(shapes) > 1:
        described = " but ".join(f"/{split}/y has targets of shape {shape}" for split, shape in target_shapes.items())
        raise DataError(f"{path}: {described}; every split needs the same target shape")
    return shapes.pop() if shapes else ()


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
    extra = {key: value for key, value in info.attrs.items() if key not in ("task", "num_classes", "feature_shape")}
    lines = [info.path, f"  task           {info.task}"]
    if info.task == "classification":
        lines.append(f"  classes        {info.num_classes}")
    else:
        lines.append(f"  target shape   {info.target_shape} ({info.outputs} model output(s))")
        if info.target_stats is not None:
            stats = info.target_stats
            lines.append(
                f"  train targets  mean {stats.mean:.6g}, std {stats.std:.6g}, "
                f"min {stats.low:.6g}, max {stats.high:.6g}"
            )
    lines += [
        f"  feature shape  {info.feature_shape}",
        *(f"  {key:<14} {value!r}" for key, value in sorted(extra.items())),
    ]
    with _open(info.path) as file:
        for split, size in info.sizes.items():
            lines.append(f"  /{split}  {size:,} samples")
            lines += [_storage(part, file[f"{split}/{part}"]) for part in ("x", "y")]
    lines += [f"  warning: {warning}" for warning in info.warnings]
    return "\n".join(lines)
