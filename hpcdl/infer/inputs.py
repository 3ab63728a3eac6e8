"""The split to score: any split of an hpcdl file, labelled (checked as training data is) or features only.

A labelled split (`/NAME/x` and `/NAME/y`) is validated by `hpcdl.data.schema.validate`. A split of features
without labels (`/NAME/x` only) needs no attributes: its feature shape is x's, and `num_classes`, when the file
has it, is checked against the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from hpcdl.data.direct import DirectRows
from hpcdl.data.loader import SplitReader
from hpcdl.data.schema import DatasetInfo, plain, validate
from hpcdl.errors import DataError


@dataclass(frozen=True)
class ScoringInput:
    """What the scoring pass needs to know of a split: its rows, sample shape, classes and whether it has labels."""

    path: str
    split: str
    rows: int
    feature_shape: tuple[int, ...]
    num_classes: int | None  # None: a features-only file without the attribute; the model's outputs decide
    labelled: bool

    def as_info(self, classes: int) -> DatasetInfo:
        """The split as `preflight.check_output` takes it, with `classes` outputs expected."""
        return DatasetInfo(self.path, classes, self.feature_shape, {self.split: self.rows}, {})


def describe_split(path: str, split: str) -> ScoringInput:
    """Check split `split` of the file at `path`; a DataError names the first problem."""
    if not os.path.isfile(path) or not h5py.is_hdf5(path):
        what = "does not exist" if not os.path.exists(path) else "is not an HDF5 file"
        raise DataError(f"{path}: {what}; give the .h5 file to score (--data)")
    try:
        with h5py.File(path, "r") as file:
            splits = sorted(name for name in file if isinstance(file[name], h5py.Group) and "x" in file[name])
            if split not in splits:
                raise DataError(
                    f"{path}: no split {split!r} (a group holding x); the file has: {', '.join(splits) or 'none'}"
                )
            if file.attrs.get("task", "classification") == "regression":
                raise DataError(
                    f"{path}: a regression set; hpcdl infer and evaluate score classifiers for now (load the run's "
                    "model.pt in PyTorch to predict, or see its val_rmse / val_r2 in summary.json)"
                )
            labelled = "y" in file[split]
            if not labelled:
                return _features_only(path, split, file)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the HDF5 file ({exc})") from None
    info = validate(path, splits=(split,))
    return ScoringInput(path, split, info.sizes[split], info.feature_shape, info.num_classes, labelled=True)


def _features_only(path: str, split: str, file: h5py.File) -> ScoringInput:
    """A split with features and no labels: x must be floating point, one row per sample."""
    x = file[f"{split}/x"]
    if not isinstance(x, h5py.Dataset) or x.dtype.kind != "f" or x.ndim < 2 or x.shape[0] == 0:
        raise DataError(
            f"{path}: '/{split}/x' must be a non-empty floating-point dataset of shape (n, *feature_shape), "
            f"found {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    classes = plain(file.attrs["num_classes"]) if "num_classes" in file.attrs else None
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 2):
        raise DataError(f"{path}: attribute num_classes must be an integer >= 2, found {classes!r}")
    return ScoringInput(path, split, int(x.shape[0]), tuple(x.shape[1:]), classes, labelled=False)


class FeatureRows:
    """Reads consecutive rows of a features-only split, as `SplitReader` reads a labelled one (which needs `y`).

    Labels come back as -1. A schedule's chunk is one contiguous run, so one read (`preadv` for an uncompressed
    file, one hyperslab otherwise) fetches it.
    """

    def __init__(self, path: str, split: str) -> None:
        self.path = path
        self.file = h5py.File(path, "r")
        self.x = self.file[f"{split}/x"]
        self.direct = DirectRows.open(path, self.x)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows `rows` (consecutive, increasing) as (features, labels of -1)."""
        x = np.empty((len(rows), *self.x.shape[1:]), dtype=self.x.dtype)
        if len(rows) and self.direct is not None:
            self.direct.read_rows(rows, x)
        elif len(rows):
            try:
                x[:] = self.x[int(rows[0]) : int(rows[-1]) + 1]
            except OSError as exc:
                raise DataError(
                    f"{self.path}: cannot read {self.x.name} rows {rows[0]}:{rows[-1] + 1}: {exc}"
                ) from None
        return x, np.full(len(rows), -1, dtype=np.int64)

    def close(self) -> None:
        """Release the file."""
        if self.direct is not None:
            self.direct.close()
        self.file.close()


def open_reader(source: ScoringInput, owned: tuple[int, int]) -> SplitReader | FeatureRows:
    """A streaming reader of the rows this rank may score (nothing cached: each row is read once)."""
    if source.labelled:
        return SplitReader(source.path, source.split, owned, cache_bytes=0)
    return FeatureRows(source.path, source.split)
