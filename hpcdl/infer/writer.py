"""Where the per-sample results go, in the input's sample order whatever rank scored which rows.

`PredictionFile`, the output of `hpcdl infer`, is written by every rank at known offsets: rank 0 lays the file out
under a temporary name (HDF5 datasets with contiguous storage allocated at creation, so each one's bytes start at
an offset HDF5 reports), and each rank `pwrite`s its rows' bytes straight there, with no gather and no rank that
serves the others; rank 0 then adds the metrics and renames the file into place. Measured against rank 0 writing
chunks gathered from the others through h5py (`tests/scripts/write_schemes.py`: 1 M rows, index + probs + logits of
10 classes, 88 MB, fsync included, this 2-core VM, quiet): offsets 0.10-0.11 s at 1, 2 and 4 ranks; gathered
0.32-0.38 s at 1 and 2 ranks, 0.87-2.67 s at 4 (oversubscribed), rank 0 the bottleneck that grows with the ranks.
Per-rank shards joined by a virtual dataset would leave one file per rank behind the output, and a dynamic
schedule's scattered chunks would need one mapping each. Across nodes the file must be on a filesystem every rank
sees (as for checkpoints); disjoint byte ranges, each rank's fsync before rank 0 reopens it.

`GatheredRows` keeps the results in memory and gathers them on rank 0 (`hpcdl.predict` without `out`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcdl.comm import World
from hpcdl.errors import HpcdlError
from hpcdl.outputs import check_new_file

OUTPUTS = ("class", "probs", "logits")  # what --outputs may name; `index` and `class` are always written
SPACE_MARGIN = 1 << 20  # HDF5 metadata and the metrics beside the rows' bytes


def columns(outputs: tuple[str, ...], classes: int, values: np.dtype) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each output column's dtype and per-row shape: index and class always, then probs/logits if asked for."""
    shapes = {"index": (np.dtype("<i8"), ()), "class": (np.dtype("<i8"), ())}
    shapes.update({name: (np.dtype(values).newbyteorder("<"), (classes,)) for name in OUTPUTS[1:] if name in outputs})
    return shapes


def check_destination(out: Path, data: str, overwrite: bool) -> None:
    """`out` can be written (its folder exists and is writable, it is not a folder, nor the input, nor an existing
    file unless `overwrite`): checked before the model is loaded."""
    if out.exists() and out.resolve() == Path(data).resolve():
        raise HpcdlError(f"--out {out} is the input file itself; write the predictions elsewhere")
    check_new_file("--out", out, overwrite)


def check_room(out: Path, nbytes: int) -> None:
    """`out`'s folder has room for `nbytes` of predictions."""
    free = shutil.disk_usage(out.parent).free
    if free < nbytes + SPACE_MARGIN:
        raise HpcdlError(
            f"--out {out}: not enough free space for the predictions ({nbytes / 1e6:,.1f} MB needed, "
            f"{free / 1e6:,.1f} MB free in {out.parent}); free space or choose another --out"
        )


class PredictionFile:
    """The output file: laid out by rank 0, filled at known offsets by every rank, completed by rank 0."""

    def __init__(self, out: Path, offsets: dict[str, int], shapes: dict[str, tuple[np.dtype, tuple[int, ...]]]):
        self.out, self.offsets, self.shapes = out, offsets, shapes
        self.partial = partial_path(out)
        self.error: str | None = None  # a failed open or write, reported once every rank has finished
        self.fd = None
        try:
            self.fd = os.open(self.partial, os.O_WRONLY)
        except OSError as exc:
            self.error = f"cannot open {self.partial} on this rank: {exc.strerror or exc}"

    @staticmethod
    def lay_out(out: Path, rows: int, shapes: dict[str, tuple[np.dtype, tuple[int, ...]]], attrs: dict) -> dict:
        """Rank 0: create the file under its temporary name, every dataset allocated; name -> byte offset."""
        partial = partial_path(out)
        try:
            with h5py.File(partial, "w") as file:
                file.attrs.update(attrs)
                offsets = {}
                for name, (dtype, row_shape) in shapes.items():
                    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # storage placed now: its offset is known
                    plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is written by a rank anyway
                    dataset = file.create_dataset(name, (rows, *row_shape), dtype, dcpl=plist)
                    offsets[name] = dataset.id.get_offset()
            return offsets
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise HpcdlError(f"cannot create {partial}: {exc}") from None

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows start.. of every column, at their place in the file (a failure is kept for `close` to report)."""
        if self.error:
            return
        try:
            for name, (dtype, row_shape) in self.shapes.items():
                data = np.ascontiguousarray(arrays[name], dtype=dtype)
                position = self.offsets[name] + start * dtype.itemsize * int(np.prod(row_shape))
                view = memoryview(data).cast("B")
                while len(view):
                    written = os.pwrite(self.fd, view, position)
                    view, position = view[written:], position + written
        except OSError as exc:
            self.error = f"cannot write {self.partial}: {exc.strerror or exc}"

    def close(self) -> str | None:
        """Make this rank's writes durable; the first failure of any write, or None."""
        if self.fd is None:
            return self.error
        try:
            if not self.error:
                os.fsync(self.fd)
        except OSError as exc:
            self.error = f"cannot write {self.partial}: {exc.strerror or exc}"
        finally:
            os.close(self.fd)
            self.fd = None
        return self.error

    def complete(self, metrics: dict[str, Any] | None) -> Path:
        """Rank 0, once every rank's rows are durable: add the metrics, then rename the file into place."""
        try:
            if metrics:
                with h5py.File(self.partial, "r+") as file:
                    group = file.create_group("metrics")
                    for name, value in metrics.items():
                        if isinstance(value, list):
                            group.create_dataset(name, data=np.array(value))
                        else:
                            group.attrs[name] = value
            _fsync(self.partial)
            os.replace(self.partial, self.out)
            _fsync(self.out.parent)  # the rename is durable only once the folder entry is
        except OSError as exc:
            self.discard()
            raise HpcdlError(f"cannot complete {self.out}: {exc.strerror or exc}") from None
        return self.out

    def discard(self) -> None:
        """Rank 0: remove the temporary file (a failed pass leaves no output)."""
        self.partial.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(out: Path) -> Path:
    """The temporary name the output has until it is complete."""
    return out.with_name(f".{out.name}.partial")


class GatheredRows:
    """Results kept in memory on each rank, joined in sample order on rank 0 at the end."""

    def __init__(self, rows: int, shapes: dict[str, tuple[np.dtype, tuple[int, ...]]]):
        self.rows, self.shapes = rows, shapes
        self.parts: list[tuple[int, dict[str, np.ndarray]]] = []
        self.error = None

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Keep rows start.. of every column."""
        self.parts.append((start, {name: np.asarray(arrays[name]) for name in self.shapes}))

    def close(self) -> str | None:
        """Nothing can fail in memory."""
        return None

    def discard(self) -> None:
        """Nothing to remove."""

    def gather(self, world: World) -> dict[str, np.ndarray] | None:
        """Rank 0: every column of every row, in sample order; None on other ranks (collective)."""
        parts = world.gather(self.parts, root=0)
        if not world.is_root:
            return None
        joined = {name: np.empty((self.rows, *shape), dtype) for name, (dtype, shape) in self.shapes.items()}
        for start, arrays in (part for rank_parts in parts for part in rank_parts):
            for name, values in arrays.items():
                joined[name][start : start + len(values)] = values
        return joined
