"""Tensor parallel equals the dense model: layers, MLPs at T = 2 and 4, with replicas, and in training."""

import json

import pytest
from torch import nn

from hpcdl import checkpoint
from hpcdl.comm import World
from hpcdl.config import ModelConfig
from hpcdl.errors import ConfigError
from hpcdl.models import MLP
from hpcdl.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
from hpcdl.parallel.tensor.strategy import tensor_parallel_mlp

from conftest import REPO, hpcdl_train, run_mpi
from reference import assert_close_states, reference_train

STEPS, BATCH, LR = 12, 48, 0.05


def test_mlp_becomes_column_then_row_pairs_and_an_odd_last_layer_stays_whole():
    rank1of2 = World(None, 1, 2, 0, 1, 0, 1)  # slicing needs only rank and size
    split = tensor_parallel_mlp(MLP(20, [16, 8], 4), rank1of2)
    assert [type(m) for m in split] == [
        nn.Flatten, ColumnParallelLinear, nn.ReLU, RowParallelLinear, nn.ReLU, nn.Linear
    ]  # fmt: skip
    assert split[1].weight.shape == (8, 20) and split[3].weight.shape == (8, 8) and split[3].bias.shape == (8,)
    with pytest.raises(ConfigError, match="hidden width 15 .layer 1. is not divisible by parallel.tensor = 2"):
        tensor_parallel_mlp(MLP(20, [15, 8], 4), rank1of2)


def test_tensor_parallel_outputs_and_gradients_equal_the_dense_layers():
    result = run_mpi(4, str(REPO / "tests/scripts/tensor_check.py"), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    # Dense (replicated) Linear layers left: 1 with an odd count of Linear layers, none with an even one.
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"T2_odd": 1, "T2_even": 0, "T4": 0, "T2xR2": 1}


def test_tensor_times_data_parallel_training_matches_reference(datasets, tmp_path):
    model = ModelConfig(name="mlp", hidden=[16, 8])
    result = hpcdl_train(
        4,
        "digits-mlp",
        f"data.path='{datasets['synthetic']}'",
        f"run.dir='{tmp_path}'",
        f"model.hidden={model.hidden}",
        f"train.batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        "train.optimizer='sgd'",
        f"train.lr={LR}",
        "train.epochs=100",
        "parallel.mode='tensor'",
        "parallel.tensor=2",
        "parallel.replicas=2",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path))
    expected = reference_train(datasets["synthetic"], model, seed=0, batch=BATCH, steps=STEPS, lr=LR)
    assert_close_states(state["model"], expected)
