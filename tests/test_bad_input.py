"""Bad input ends every rank promptly with a clear message and a non-zero exit, and writes nothing."""

import h5py
import numpy as np
import pytest

from conftest import hpcdl_train

RANKS = 4


def write_h5(path, n_train=200, n_val=40, features=8, classes=3, x_dtype="float32", y_dtype="int64", edit=None):
    """A small valid file, optionally broken by `edit(file)` before closing."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update(num_classes=classes, feature_shape=np.array([features]), generator="test", seed=0)
        for split, n in (("train", n_train), ("val", n_val)):
            f[f"{split}/x"] = rng.random((n, features)).astype(x_dtype)
            f[f"{split}/y"] = rng.integers(0, classes, n).astype(y_dtype)
        if edit:
            edit(f)
    return path


def nan_in_features(f):
    f["train/x"][17, 3] = np.nan


def label_out_of_range(f):
    f["train/y"][5] = 9


def length_mismatch(f):
    del f["train/y"]
    f["train/y"] = np.zeros(150, dtype=np.int64)


def missing_dataset(f):
    del f["val/y"]


BAD_FILES = {
    "missing dataset": (dict(edit=missing_dataset), "/val/y"),
    "length mismatch": (dict(edit=length_mismatch), "200"),
    "wrong dtype": (dict(x_dtype="float64"), "float64"),
    "label out of range": (dict(edit=label_out_of_range), "label"),
    "nan with scan": (dict(edit=nan_in_features), "nan"),
    "too few samples": (dict(n_train=40), "fewer than one global batch"),
}


def assert_failed_cleanly(result, run_dir, words):
    assert result.returncode != 0, f"expected a failure, got success:\n{result.stdout}"
    assert words.lower() in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not run_dir.exists(), "a failed start must leave no run folder"


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file(tmp_path, case):
    options, words = BAD_FILES[case]
    data = write_h5(tmp_path / "bad.h5", **options)
    run_dir = tmp_path / "run"
    result = hpcdl_train(
        RANKS,
        "digits-mlp",
        f"data.path='{data}'",
        f"run.dir='{run_dir}'",
        "data.scan=true",
        "train.batch_size=64",
        timeout=60,
    )
    assert_failed_cleanly(result, run_dir, words)


def test_missing_file(tmp_path):
    result = hpcdl_train(
        RANKS, "digits-mlp", f"data.path='{tmp_path}/nope.h5'", f"run.dir='{tmp_path}/run'", timeout=60
    )
    assert_failed_cleanly(result, tmp_path / "run", "does not exist")


def test_not_hdf5(tmp_path):
    data = tmp_path / "notes.h5"
    data.write_text("these are not the samples you are looking for\n")
    result = hpcdl_train(RANKS, "digits-mlp", f"data.path='{data}'", f"run.dir='{tmp_path}/run'", timeout=60)
    assert_failed_cleanly(result, tmp_path / "run", "not an HDF5 file")


def test_batch_not_divisible_by_ranks(tmp_path):
    data = write_h5(tmp_path / "ok.h5")
    result = hpcdl_train(
        RANKS, "digits-mlp", f"data.path='{data}'", f"run.dir='{tmp_path}/run'", "train.batch_size=66", timeout=60
    )
    assert_failed_cleanly(result, tmp_path / "run", "not divisible by the 4 ranks; use a multiple of 4")


def test_unknown_model(tmp_path):
    result = hpcdl_train(RANKS, "digits-mlp", "model.name='transformer'", f"run.dir='{tmp_path}/run'", timeout=60)
    assert_failed_cleanly(result, tmp_path / "run", "model.name = 'transformer' is not one of")


def test_unknown_config_key(tmp_path):
    result = hpcdl_train(RANKS, "digits-mlp", "train.learning_rate=0.1", f"run.dir='{tmp_path}/run'", timeout=60)
    assert_failed_cleanly(result, tmp_path / "run", "unknown key 'train.learning_rate'")


def test_nan_without_scan_is_caught_at_the_step(tmp_path):
    """Without the scan the file is accepted; the per-step guard then stops at the NaN (not a guess)."""
    data = write_h5(tmp_path / "features.h5", edit=nan_in_features)
    result = hpcdl_train(
        RANKS, "digits-mlp", f"data.path='{data}'", f"run.dir='{tmp_path}/run'", "train.batch_size=200", timeout=60
    )
    assert result.returncode != 0
    assert "non-finite loss at step 1" in result.stderr, result.stderr
    assert "has NaN/Inf values" not in result.stderr, "the scan must not have run"
