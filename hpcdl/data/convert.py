"""`hpcdl data convert`: a user's own arrays (.npy, .npz, CSV) into the hpcdl HDF5 schema.

Sources are read row block by row block (never whole), validated as they go
(numeric dtype, equal lengths, integral labels in 0..C-1 or, for regression,
finite float targets of any per-sample shape, no NaN/Inf, no ragged CSV rows)
and handed to the one shared writer in `make.py`, which writes a temporary
file and renames it into place only when everything succeeded. Errors
name the file and the offending row (and, for CSV, its line).
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hpcdl.data.make import BLOCK_BYTES, _check_args, _split_sizes, _write
from hpcdl.data.schema import TASKS, DatasetInfo
from hpcdl.errors import DataError

Block = tuple[np.ndarray, np.ndarray]  # (features, labels) of consecutive rows


def _split_spec(spec: str) -> tuple[str, str | None]:
    """'FILE' or 'FILE:NAME' (an .npz member or a CSV label column)."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, name = spec.rpartition(":")
    return path, name or None


def _check_readable(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: file is not readable (permissions)")


class ArrayRows:
    """Rows of one array in a .npy (memory-mapped) or a .npz member (streamed), read in order."""

    def __init__(self, path: str, name: str | None, default_name: str):
        _check_readable(path)
        self.path, self.name = path, name or default_name
        self.label = f"{path}:{self.name}" if path.endswith(".npz") else path
        self._open()
        if self.dtype.kind not in "biuf":
            what = "ragged or mixed rows (object array)" if self.dtype.kind == "O" else f"dtype {self.dtype}"
            raise DataError(f"{self.label}: {what} is not numeric; store a numeric array with equal-length rows")
        if len(self.shape) == 0:
            raise DataError(f"{self.label}: is a scalar; need one row per sample")
        self.rows = int(self.shape[0])

    def _open(self) -> None:
        self.position, self._stream = 0, None
        try:
            if self.path.endswith(".npz"):
                self._archive = archive = zipfile.ZipFile(self.path)
                member = f"{self.name}.npy"
                if member not in archive.namelist():
                    names = ", ".join(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
                    raise DataError(f"{self.path}: has no array named '{self.name}' (it has: {names or 'none'})")
                self._stream = archive.open(member)
                version = np.lib.format.read_magic(self._stream)
                reader = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                self.shape, fortran, self.dtype = reader(self._stream)
                if fortran and len(self.shape) > 1:
                    raise DataError(f"{self.label}: is Fortran-ordered; save np.ascontiguousarray(array) instead")
            else:
                with open(self.path, "rb") as handle:
                    if handle.read(6) != b"\x93NUMPY":
                        raise DataError(f"{self.path}: cannot read it as a NumPy .npy file (no .npy header)")
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
                self.shape, self.dtype = self._array.shape, self._array.dtype
        except DataError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            if "allow_pickle" in str(exc) or "Python objects" in str(exc):
                raise DataError(
                    f"{self.label}: ragged or non-numeric (object) array; store equal-length numeric rows"
                ) from None
            raise DataError(f"{self.path}: cannot read it as a NumPy {self.path[-4:]} file ({exc})") from None

    def read(self, count: int) -> np.ndarray:
        """The next `count` rows (fewer at the end)."""
        count = min(count, self.rows - self.position)
        if self._stream is None:
            block = np.asarray(self._array[self.position : self.position + count])
        else:
            row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
            raw = self._stream.read(count * row_bytes)
            if len(raw) != count * row_bytes:
                raise DataError(f"{self.label}: truncated at row {self.position + len(raw) // max(row_bytes, 1)}")
            block = np.frombuffer(raw, dtype=self.dtype).reshape(count, *self.shape[1:])
        self.position += count
        return block

    def restart(self) -> None:
        """Back to row 0 (a stream is reopened)."""
        if self._stream is not None:
            self._stream.close()
            self._archive.close()
        self._open()


class CsvRows:
    """A CSV file of numbers, one sample per line: the label column(s) and the feature columns."""

    def __init__(self, path: str, label_column: str | None):
        _check_readable(path)
        self.path = path
        first = self._first_row()
        self.header = not all(_is_number(field) for field in first)
        self.columns = len(first)
        self.label_indices = self._label_indices(first, label_column)
        if self.columns <= len(self.label_indices):
            raise DataError(f"{path}: line 1 has {self.columns} column(s); need a label column and features")
        self.shape = (None, self.columns - len(self.label_indices))
        # One label column gives scalar targets (regression), several a vector of them.
        self.target_shape = () if len(self.label_indices) == 1 else (len(self.label_indices),)
        self.rows = sum(1 for _ in self._rows())

    def _first_row(self) -> list[str]:
        for _, row in self._lines():
            return row
        raise DataError(f"{self.path}: is empty")

    def _label_indices(self, first: list[str], label_column: str | None) -> list[int]:
        """The label columns' indices: 'label', else the last; or those named, separated by commas."""
        if label_column is None:
            return [first.index("label") if self.header and "label" in first else self.columns - 1]
        indices = [self._label_index(first, name) for name in label_column.split(",")]
        if len(set(indices)) != len(indices):
            raise DataError(f"{self.path}: label columns {label_column!r} name a column twice; name each once")
        return indices

    def _label_index(self, first: list[str], label_column: str) -> int:
        if label_column.lstrip("-").isdigit():
            index = int(label_column)
            if not -self.columns <= index < self.columns:
                raise DataError(f"{self.path}: label column {index} is outside its {self.columns} columns")
            return index % self.columns
        if not self.header or label_column not in first:
            raise DataError(
                f"{self.path}: no column named '{label_column}' in the header {first if self.header else '(none)'}"
            )
        return first.index(label_column)

    def _lines(self) -> Iterator[tuple[int, list[str]]]:
        try:
            with open(self.path, newline="") as handle:
                for line, row in enumerate(csv.reader(handle), start=1):
                    if row:
                        yield line, row
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{self.path}: cannot read it as CSV ({exc})") from None

    def _rows(self) -> Iterator[tuple[int, int, list[str]]]:
        """(sample row, file line, fields) of every data line, checking that no row is ragged."""
        lines = self._lines()
        if self.header:
            next(lines)
        for row, (line, fields) in enumerate(lines):
            if len(fields) != self.columns:
                raise DataError(
                    f"{self.path}: row {row} (line {line}) has {len(fields)} columns, expected {self.columns}"
                )
            yield row, line, fields

    def blocks(self, rows_per_block: int) -> Iterator[tuple[int, Block]]:
        """(first row, (features float64, labels float64)) for consecutive blocks of rows."""
        pending: list[list[str]] = []
        where: list[tuple[int, int]] = []
        for row, line, fields in self._rows():
            pending.append(fields)
            where.append((row, line))
            if len(pending) == rows_per_block:
                yield where[0][0], self._parse(pending, where)
                pending, where = [], []
        if pending:
            yield where[0][0], self._parse(pending, where)

    def _parse(self, rows: list[list[str]], where: list[tuple[int, int]]) -> Block:
        try:
            table = np.array(rows, dtype=np.float64)
        except ValueError:
            for fields, (row, line) in zip(rows, where):
                bad = next((f for f in fields if not _is_number(f)), None)
                if bad is not None:
                    raise DataError(f"{self.path}: row {row} (line {line}) has a non-numeric value {bad!r}") from None
            raise
        labels = table[:, self.label_indices].reshape(len(table), *self.target_shape)
        return np.delete(table, self.label_indices, axis=1), labels

    def line_of(self, row: int) -> str:
        """' (line L)' for a sample row, to name it as an editor would."""
        for r, line, _ in self._rows():
            if r == row:
                return f" (line {line})"
        return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Source:
    """One split's samples: features and labels, read together block by block."""

    x: ArrayRows | CsvRows
    y: ArrayRows | None  # None when the labels are a column of a CSV `x`

    @property
    def rows(self) -> int:
        """Samples in this source."""
        return self.x.rows

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one sample as stored in the source."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one sample's label or target as stored in the source."""
        return self.x.target_shape if self.y is None else tuple(int(d) for d in self.y.shape[1:])

    def name_row(self, row: int, labels: bool = False) -> str:
        """'FILE: row R' (with the CSV line), naming where sample `row` (or its label) came from."""
        if isinstance(self.x, CsvRows):
            return f"{self.x.path}: row {row}{self.x.line_of(row)}"
        return f"{(self.y if labels else self.x).label}: row {row}"

    def blocks(self, rows_per_block: int) -> Iterator[tuple[int, Block]]:
        """(first row, (features, labels)) for consecutive blocks, from the start."""
        if isinstance(self.x, CsvRows):
            yield from self.x.blocks(rows_per_block)
            return
        self.x.restart()
        self.y.restart()
        for start in range(0, self.rows, rows_per_block):
            yield start, (self.x.read(rows_per_block), self.y.read(rows_per_block))


def open_source(
    x_spec: str, y_spec: str | None, label_column: str | None = None, task: str = "classification"
) -> Source:
    """The (features, labels or targets) source named on the command line, checked for matching lengths."""
    x_path, x_name = _split_spec(x_spec)
    if x_path.endswith(".csv"):
        if y_spec is not None:
            raise DataError(f"{x_path}: a CSV holds its own labels; name their column with --label-column, not --y")
        rows = CsvRows(x_path, label_column or x_name)
        if task == "classification" and len(rows.label_indices) > 1:
            raise DataError(
                f"{x_path}: {len(rows.label_indices)} label columns given; classification takes one "
                "(several targets need --task regression)"
            )
        return Source(rows, None)
    if not x_path.endswith((".npy", ".npz")):
        raise DataError(f"{x_path}: unknown format; give a .npy, a .npz (FILE.npz:NAME) or a .csv file")
    if y_spec is None:
        if x_path.endswith(".npz"):
            y_spec = f"{x_path}:y"
        else:
            raise DataError(f"{x_path}: labels are needed: give --y LABELS.npy (or FILE.npz:NAME)")
    y_path, y_name = _split_spec(y_spec)
    if not y_path.endswith((".npy", ".npz")):
        raise DataError(f"{y_path}: labels must be a .npy or a .npz array (FILE.npz:NAME)")
    x, y = ArrayRows(x_path, x_name, "x"), ArrayRows(y_path, y_name, "y")
    if len(x.shape) < 2:
        raise DataError(f"{x.label}: has shape {x.shape}; features need one row per sample, shape (n, features...)")
    if task == "classification" and len(y.shape) != 1 and not (len(y.shape) == 2 and y.shape[1] == 1):
        raise DataError(f"{y.label}: has shape {y.shape}; labels need one class index per sample, shape (n,)")
    if x.rows != y.rows:
        raise DataError(f"{x.label} has {x.rows} rows but {y.label} has {y.rows}; need one label per sample")
    return Source(x, y)


def _check_samples(source: Source) -> None:
    """A source without a single sample is refused by name, before anything counts its labels or splits it."""
    if source.rows:
        return
    if isinstance(source.x, CsvRows):  # a CSV's first line is a sample unless it is a header
        raise DataError(f"{source.x.path}: has a header line but no data rows; add the samples below it, one per line")
    raise DataError(f"{source.x.label}: has no rows (shape {source.x.shape}); give one row per sample")


def _labels(source: Source, block: np.ndarray, start: int, classes: int | None) -> np.ndarray:
    """Labels as int64 class indices; the first non-integral, negative or out-of-range one is an error."""
    block = block.reshape(-1)
    if block.dtype.kind in "f":
        bad = np.flatnonzero(~np.isfinite(block) | (block != np.round(block)))
        if len(bad):
            raise DataError(
                f"{source.name_row(start + int(bad[0]), labels=True)}: label {block[bad[0]]} is not a class index"
            )
    labels = block.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= (classes or np.iinfo(np.int64).max)))
    if len(bad):
        where, label = source.name_row(start + int(bad[0]), labels=True), labels[bad[0]]
        if classes is None:
            raise DataError(f"{where}: label {label} is negative; labels must be class indices 0, 1, 2, ...")
        raise DataError(f"{where}: label {label} is outside 0..{classes - 1} (--classes {classes})")
    return labels


def _float32_rows(
    source: Source, block: np.ndarray, start: int, shape: tuple[int, ...], targets: bool = False
) -> np.ndarray:
    """Features or regression targets as float32 in `shape`; the first NaN or Inf (even after the cast) is an error."""
    with np.errstate(over="ignore", invalid="ignore"):
        rows = block.astype(np.float32).reshape(len(block), *shape)
    finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        kind = "NaN" if np.isnan(rows[row]).any() else "Inf (or a value beyond float32's range)"
        what = "targets" if targets else "features"
        raise DataError(f"{source.name_row(start + row, labels=targets)}: {what} hold {kind}; fix or drop that sample")
    return rows


def _scan_labels(source: Source, rows_per_block: int) -> int:
    """The largest label (after checking every label is a non-negative integer)."""
    high = -1
    for start, (_, y) in source.blocks(rows_per_block):
        labels = _labels(source, y, start, None)
        if len(labels):
            high = max(high, int(labels.max()))
    return high


def _rows_per_block(source: Source) -> int:
    return max(1, BLOCK_BYTES // (8 * (math.prod(source.row_shape) + math.prod(source.target_shape))))


def convert(
    x: str,
    y: str | None,
    out: str | os.PathLike,
    *,
    val_x: str | None = None,
    val_y: str | None = None,
    val_fraction: float = 0.1,
    label_column: str | None = None,
    task: str = "classification",
    classes: int | None = None,
    feature_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Write the user's arrays as an hpcdl dataset (atomically); a seeded random `val_fraction` goes to /val.

    `task` "classification" takes integer class labels; "regression" float targets of any per-sample shape.
    """
    _check_args(seed)
    if task not in TASKS:
        raise DataError(f"--task must be classification or regression, got {task!r}")
    if task == "regression" and classes is not None:
        raise DataError("--classes is for classification; leave it out with --task regression")
    if val_y is not None and val_x is None:
        raise DataError("--val-y needs --val-x: give the validation features too")
    train = open_source(x, y, label_column, task)
    val = open_source(val_x, val_y, label_column, task) if val_x else None
    sources = [s for s in (train, val) if s is not None]
    for source in sources:
        _check_samples(source)
    shape = feature_shape or train.row_shape
    for source in sources:
        if math.prod(source.row_shape) != math.prod(shape) or (val and source.row_shape != train.row_shape):
            raise DataError(
                f"{source.name_row(0)}: samples of shape {source.row_shape} do not fit feature shape {tuple(shape)}"
            )
    blocks = {id(s): _rows_per_block(s) for s in sources}
    if task == "classification":
        target_shape = None
        high = max(_scan_labels(s, blocks[id(s)]) for s in sources)
        classes = classes if classes is not None else high + 1
        if classes < 2:
            raise DataError(f"{train.name_row(0)}: labels span {classes} class(es); need at least 2 (or set --classes)")
    else:
        target_shape = train.target_shape
        if val is not None and val.target_shape != target_shape:
            raise DataError(
                f"{val.name_row(0, labels=True)}: targets of shape {val.target_shape} do not match the training "
                f"targets' {target_shape}; give both splits the same target shape"
            )

    def rows(source: Source, keep: np.ndarray | None = None) -> Iterator[Block]:
        for start, (xb, yb) in source.blocks(blocks[id(source)]):
            xb = _float32_rows(source, xb, start, shape)
            if target_shape is None:
                yb = _labels(source, yb, start, classes)
            else:
                yb = _float32_rows(source, yb, start, target_shape, targets=True)
            if keep is not None:
                pick = keep[start : start + len(xb)]
                xb, yb = xb[pick], yb[pick]
            yield xb, yb

    if val is not None:
        sizes = {"train": train.rows, "val": val.rows}
        stream = (block for source in (train, val) for block in rows(source))
        split = f"val from {val_x}"
    else:
        n_train, n_val = _split_sizes(train.rows, val_fraction)
        # A seeded random choice of val rows (the file may be sorted by class); one byte per row.
        is_val = np.zeros(train.rows, dtype=bool)
        is_val[np.random.default_rng(seed).choice(train.rows, n_val, replace=False)] = True
        sizes = {"train": n_train, "val": n_val}
        stream = (block for keep in (~is_val, is_val) for block in rows(train, keep))
        split = f"val a seeded random {val_fraction:g} of the rows"
    description = f"converted from {x}" + (f" and {y}" if y else "") + f"; {split}"
    return _write(
        out,
        stream,
        sizes=sizes,
        feature_shape=tuple(shape),
        num_classes=classes or 0,  # None for regression, which has no classes
        target_shape=target_shape,
        attrs={"generator": "convert", "seed": seed, "description": description},
        chunk_rows=chunk_rows,
        compression=compression,
        checksum=checksum,
        progress=progress,
    )
