"""Partitioning by columns: each rank reads its feature columns; the model equals the unsplit one."""

import h5py
import pytest

from hpcdl import checkpoint
from hpcdl.config import ModelConfig
from hpcdl.data import make
from hpcdl.data.partition import block_range

from conftest import hpcdl_train
from reference import assert_close_states, reference_train

FEATURES, BATCH, LR = 23, 48, 0.05  # 23 columns: uneven over 2 (12 + 11) and 4 ranks (6 + 6 + 6 + 5)
MODEL = ModelConfig(name="mlp", hidden=[16, 8])


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = tmp_path_factory.mktemp("columns") / "wide.h5"
    make.make_synthetic(path, n=600, features=FEATURES, classes=4, progress=False, chunk_rows=64)
    return path


def train_columns(ranks, data, run_dir, steps, *sets, extra=()):
    return hpcdl_train(
        ranks,
        "synthetic-mlp",
        f"data.path='{data}'",
        f"run.dir='{run_dir}'",
        "parallel.mode='columns'",
        f"model.hidden={MODEL.hidden}",
        f"train.batch_size={BATCH}",
        f"train.max_steps={steps}",
        "train.epochs=100",
        f"train.lr={LR}",
        "run.progress=false",
        *sets,
        extra=extra,
    )


def test_column_range_covers_every_feature_once():
    for features, size in ((23, 2), (23, 4), (7, 7), (100, 3)):
        ranges = [block_range(features, r, size) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == features
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_columns_match_unsplit_model_and_resume_across_rank_counts(wide, tmp_path):
    # 4 ranks, streamed column hyperslabs (cache 0), 6 steps; then resumed at 2 ranks, cached, to 12.
    four = train_columns(4, wide, tmp_path / "run", 6, "data.cache_mb=0")
    assert four.returncode == 0, four.stderr
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path / "run"))
    assert_close_states(state["model"], reference_train(wide, MODEL, seed=0, batch=BATCH, steps=6, lr=LR))
    # The first layer's momentum is gathered whole, so any number of ranks can resume it.
    momentum = state["optimizer"]["state"][0]["momentum_buffer"]
    assert tuple(momentum.shape) == (MODEL.hidden[0], FEATURES)

    two = train_columns(2, wide, tmp_path / "run", 12, "data.prefetch=3", extra=("--resume",))
    assert two.returncode == 0, two.stderr
    resumed = checkpoint.load(checkpoint.resolve("latest", tmp_path / "run"))
    assert resumed["global_step"] == 12
    expected = reference_train(wide, MODEL, seed=0, batch=BATCH, steps=12, lr=LR)
    assert_close_states(resumed["model"], expected)


def test_columns_at_three_ranks_from_scratch_with_the_old_spelling(wide, tmp_path):
    # 23 columns over 3 ranks: 8 + 8 + 7; data.partition = 'columns' still works, and says what to use now.
    result = train_columns(3, wide, tmp_path, 12, "parallel.mode='data'", "data.partition='columns'")
    assert result.returncode == 0, result.stderr
    assert "parallel.mode columns" in result.stdout
    assert result.stdout.count("data.partition = 'columns' is deprecated: use parallel.mode = 'columns'") == 1
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path))
    assert_close_states(state["model"], reference_train(wide, MODEL, seed=0, batch=BATCH, steps=12, lr=LR))
    with h5py.File(wide) as f:
        assert state["model"]["1.weight"].shape[1] == f["train/x"].shape[1]


def test_columns_need_an_mlp_on_flat_samples(datasets, tmp_path):
    cnn = ("model.name='cnn'", "model.channels=[4]", "model.hidden=[128]")  # the MLP's hidden sizes: default
    result = train_columns(2, datasets["images"], tmp_path, 2, *cnn)
    assert result.returncode != 0
    assert "needs model.name = 'mlp'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
