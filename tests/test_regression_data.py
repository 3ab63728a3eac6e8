"""Regression data: the `task` attribute, float targets of any shape, `data make diabetes`, convert and the loader."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes

from hpcdl.cli import main
from hpcdl.data import loader
from hpcdl.data.loader import Loader, SplitReader
from hpcdl.data.partition import Partition
from hpcdl.data.schema import describe, validate
from hpcdl.errors import DataError

FEATURES = 5


def write_regression_h5(path, target_shape=(), n_train=100, n_val=20, y_dtype="float32", task="regression", edit=None):
    """A small valid regression file with targets of `target_shape` per sample, optionally broken by `edit(file)`."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update(task=task, feature_shape=np.array([FEATURES]), generator="test", seed=0)
        for split, n in (("train", n_train), ("val", n_val)):
            f.create_dataset(f"{split}/x", data=rng.random((n, FEATURES), dtype=np.float32), chunks=(10, FEATURES))
            y = rng.standard_normal((n, *target_shape)).astype(y_dtype)
            f.create_dataset(f"{split}/y", data=y, chunks=(10, *target_shape))
        if edit:
            edit(f)
    return str(path)


def refused(path) -> str:
    """validate's one-line message for a bad file."""
    with pytest.raises(DataError) as caught:
        validate(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


# ---- schema ------------------------------------------------------------------------------------------


def test_scalar_targets_validate_and_describe(tmp_path):
    path = write_regression_h5(tmp_path / "r.h5")
    info = validate(path, scan=True)
    assert (info.task, info.target_shape, info.outputs, info.num_classes) == ("regression", (), 1, 0)
    assert info.sizes == {"train": 100, "val": 20} and info.warnings == ()
    with h5py.File(path) as f:
        train = f["train/y"][:].astype(np.float64)
    stats = info.target_stats
    assert stats.count == 100 and stats.low == train.min() and stats.high == train.max()
    assert stats.mean == pytest.approx(train.mean()) and stats.std == pytest.approx(train.std())
    text = describe(info)
    assert "task           regression" in text and "target shape   () (1 model output(s))" in text
    assert f"train targets  mean {stats.mean:.6g}, std {stats.std:.6g}" in text and "classes" not in text


@pytest.mark.parametrize("shape, outputs", [((3,), 3), ((2, 4), 8)])
def test_vector_targets(tmp_path, shape, outputs):
    info = validate(write_regression_h5(tmp_path / "r.h5", target_shape=shape))
    assert info.target_shape == shape and info.outputs == outputs


def test_float64_targets_are_accepted(tmp_path):
    assert validate(write_regression_h5(tmp_path / "r.h5", y_dtype="float64")).task == "regression"


def test_num_classes_is_ignored_for_regression(tmp_path):
    path = write_regression_h5(tmp_path / "r.h5", edit=lambda f: f.attrs.update(num_classes=1))
    assert validate(path).num_classes == 0


def set_target(split, row, value):
    def edit(f):
        f[f"{split}/y"][row] = value

    return edit


def two_targets_in_val(f):
    del f["val/y"]
    f.create_dataset("val/y", data=np.zeros((20, 2), dtype=np.float32))


def drop_seed(f):
    del f.attrs["seed"]


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(edit=set_target("train", 37, np.nan)), "'/train/y' has a non-finite target in row 37 (nan)"),
        (dict(edit=set_target("val", 4, np.inf), target_shape=(3,)), "'/val/y' has a non-finite target in row 4 (inf)"),
        (dict(task="regresion"), "attribute task must be 'classification' or 'regression', found 'regresion'"),
        (dict(y_dtype="int64"), "'/train/y' has dtype int64; regression targets must be float32"),
        (dict(edit=two_targets_in_val), "/train/y has targets of shape () but /val/y has targets of shape (2,)"),
        (dict(edit=drop_seed), "missing file attribute 'seed' (expected feature_shape, generator, seed;"),
    ],
    ids=["nan", "inf in a vector", "unknown task", "int targets", "shapes differ", "missing attribute"],
)
def test_bad_regression_files(tmp_path, options, words):
    assert words in refused(write_regression_h5(tmp_path / "bad.h5", **options))


def test_classification_files_are_unchanged(datasets):
    info = validate(datasets["digits"])
    assert (info.task, info.target_shape, info.outputs, info.num_classes) == ("classification", (), 10, 10)
    assert info.target_stats is None and "task" not in info.attrs
    text = describe(info)
    assert "task           classification" in text and "classes        10" in text


# ---- data make diabetes --------------------------------------------------------------------------------


def test_make_diabetes(tmp_path, capsys):
    out = tmp_path / "diabetes.h5"
    assert main(["data", "make", "diabetes", "--out", str(out)]) == 0
    assert "task           regression" in capsys.readouterr().out
    info = validate(out, scan=True)
    assert info.sizes == {"train": 354, "val": 88} and info.feature_shape == (10,) and info.outputs == 1
    assert info.attrs["generator"] == "diabetes" and info.attrs["task"] == "regression"
    with h5py.File(out) as f:
        train, val = f["train/y"][:], f["val/y"][:]
        mean, std = f.attrs["target_mean"], f.attrs["target_std"]
    assert train.dtype == np.float32 and np.isfinite(np.concatenate([train, val])).all()
    assert abs(train.mean()) < 1e-5 and train.std() == pytest.approx(1.0, abs=1e-5)
    original = np.sort(load_diabetes().target)
    assert np.allclose(np.sort(np.concatenate([train, val]) * std + mean), original, atol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == ["diabetes.h5"], "no temporary file may be left"


# ---- data convert --task regression --------------------------------------------------------------------


def convert(capsys, *args):
    code = main(["data", "convert", "--no-progress", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err


def stored_targets(path) -> np.ndarray:
    with h5py.File(path) as f:
        assert f["train/y"].dtype == np.float32 and f.attrs["task"] == "regression" and "num_classes" not in f.attrs
        return np.concatenate([f["train/y"][:], f["val/y"][:]])


def test_convert_arrays(tmp_path, capsys):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((60, 4)), rng.standard_normal((60, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "o.h5"
    code, err = convert(
        capsys, "--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy", "--task", "regression", "--out", out
    )
    assert code == 0, err
    assert validate(out).target_shape == (3,)
    got = stored_targets(out)
    assert np.array_equal(got[np.lexsort(got.T)], y.astype(np.float32)[np.lexsort(y.astype(np.float32).T)])


def test_convert_csv_target_columns(tmp_path, capsys):
    rows = [f"{i},{i % 7},{i * 0.25},{-i}" for i in range(40)]
    (tmp_path / "t.csv").write_text("a,b,price,cost\n" + "\n".join(rows) + "\n")
    for columns, shape, features in (("price", (), 3), ("price,3", (2,), 2)):
        out = tmp_path / f"{features}.h5"
        code, err = convert(
            capsys, "--x", tmp_path / "t.csv", "--label-column", columns, "--task", "regression", "--out", out
        )
        assert code == 0, err
        info = validate(out)
        assert info.target_shape == shape and info.feature_shape == (features,)
        prices = stored_targets(out).reshape(len(rows), -1)[:, 0]  # column 'price' comes first either way
        assert np.array_equal(np.sort(prices), np.arange(40, dtype=np.float32) * 0.25)


@pytest.mark.parametrize(
    "csv, options, words",
    [
        ("a,target\n1,2.5\n2,nan\n3,1\n4,0\n", (), "t.csv: row 1 (line 3): targets hold NaN"),
        ("a,target\n1,2.5\n2,high\n3,1\n4,0\n", (), "t.csv: row 1 (line 3) has a non-numeric value 'high'"),
        ("a,b,c\n1,2,3\n4,5,6\n", ("--classes", "3"), "--classes is for classification"),
        ("a,b,c\n1,2,3\n4,5,6\n", ("--task", "ranking"), "--task must be classification or regression"),
    ],
    ids=["nan", "non-numeric", "classes", "unknown task"],
)
def test_convert_bad_targets(tmp_path, capsys, csv, options, words):
    (tmp_path / "t.csv").write_text(csv)
    task = () if "--task" in options else ("--task", "regression")
    out = tmp_path / "o.h5"
    code, err = convert(capsys, "--x", tmp_path / "t.csv", "--val-fraction", "0.5", *task, *options, "--out", out)
    assert code != 0 and words in err and err.count("\n") == 1 and err.startswith("hpcdl: error: "), err
    assert not out.exists()


def test_classification_refuses_several_label_columns(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("a,b,c\n1,2,3\n4,5,6\n")
    code, err = convert(capsys, "--x", tmp_path / "t.csv", "--label-column", "b,c", "--out", tmp_path / "o.h5")
    assert code != 0 and "classification takes one (several targets need --task regression)" in err, err


# ---- loader ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cache_bytes, label_cache_bytes",
    [(1 << 30, 1 << 30), (0, 1 << 30), (0, 0)],
    ids=["cached", "streamed", "streamed-targets-read-per-batch"],
)
@pytest.mark.parametrize("shape, y_dtype", [((), "float32"), ((3,), "float64")], ids=["scalar", "vector-float64"])
def test_loader_yields_float32_targets(tmp_path, monkeypatch, shape, y_dtype, cache_bytes, label_cache_bytes):
    monkeypatch.setattr(loader, "LABEL_CACHE_BYTES", label_cache_bytes)
    path = write_regression_h5(tmp_path / "r.h5", target_shape=shape, y_dtype=y_dtype)
    with h5py.File(path) as f:
        want = f["train/y"][:].astype(np.float32)
    part = Partition(100, 16, 0, 1, seed=0)
    reader = SplitReader(path, "train", part.owned_range(), cache_bytes)
    try:
        batches = list(Loader(reader, part, prefetch=1).epoch(0))
    finally:
        reader.close()
    for batch in batches:
        assert batch.y.dtype == torch.float32 and tuple(batch.y.shape) == (len(batch.x), *shape)
        assert np.array_equal(batch.y.numpy(), want[batch.indices])
    assert sum(len(b.y) for b in batches) == 100
