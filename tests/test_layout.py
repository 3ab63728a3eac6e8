"""The seam's pieces in one process: the layout's every rule and message, World.agree, the grid, the bucket engine."""

import math

import pytest
import torch
from torch import nn

from hpcdl import comm, config
from hpcdl.data.schema import DatasetInfo
from hpcdl.errors import ConfigError, DataError, HpcdlError
from hpcdl.models import MLP, RNN
from hpcdl.parallel.grad_sync import GradSync, group_parameters
from hpcdl.parallel.grid import Grid
from hpcdl.parallel.layout import Layout


def layout(world_size: int, *sets: str) -> Layout:
    return Layout.from_config(config.load("digits-mlp", list(sets)), world_size)


def info(train: int = 100, shape: tuple[int, ...] = (64,)) -> DatasetInfo:
    return DatasetInfo(path="d.h5", feature_shape=shape, num_classes=10, sizes={"train": train, "val": 10}, attrs={})


@pytest.mark.parametrize(
    "world_size, sets, message",
    [
        (3, ("train.batch_size=64",), "batch_size = 64 is not divisible by the 3 ranks; use a multiple of 3 (e.g. 63)"),
        (4, ("parallel.mode='pipeline'", "parallel.stages=2"),
         "needs 2 ranks, but the job has 4; use --set parallel.replicas=2"),
        (4, ("parallel.mode='tensor'", "parallel.tensor=3"),
         "needs 3 ranks, but the job has 4; run on a multiple of 3"),
        (2, ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.micro_batches=5", "train.batch_size=48"),
         "split into 1 replica(s) x 5 micro-batches; use a multiple of 5 (e.g. 45)"),
        (4, ("parallel.mode='tensor'", "parallel.tensor=2", "parallel.replicas=2", "train.batch_size=63"),
         "split into 2 replica(s) x 1 micro-batches; use a multiple of 2 (e.g. 62)"),
        (2, ("parallel.stages=2",), "parallel.stages = 2 takes effect only with parallel.mode = 'pipeline'"),
        (2, ("parallel.servers=2",), "parallel.servers = 2 takes effect only with parallel.mode = 'ps-sync'"),
        (2, ("parallel.local_steps=8",), "parallel.local_steps = 8 takes effect only with parallel.mode = 'local-sgd'"),
        (2, ("parallel.mode='ps-sync'", "parallel.servers=2"),
         "parallel.servers = 2 leaves no worker among the job's 2 ranks; use at most 1 server(s)"),
        (4, ("parallel.mode='ps-sync'", "train.batch_size=64"),
         "not divisible by the 3 workers (4 ranks less 1 server(s)); use a multiple of 3 (e.g. 63)"),
        (3, ("parallel.mode='ps-async'", "train.clip_grad_norm=1.0"),
         "train.clip_grad_norm = 1.0 is not available with parallel.mode = 'ps-async'"),
        (3, ("parallel.mode='ps-async'", "train.precision='fp16'"),
         "train.precision = 'fp16' is not available with parallel.mode = 'ps-async'"),
        (2, ("parallel.replicas=2",), "parallel.replicas = 2 takes effect only with"),
        (2, ("parallel.mode='columns'", "parallel.tensor=2"), "parallel.tensor = 2 takes effect only with"),
        (2, ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.cuts=[1, 3]"),
         "parallel.cuts = [1, 3] must name 1 layer indices for parallel.stages = 2"),
    ],
)  # fmt: skip
def test_each_layout_rule_names_the_key_and_what_would_work(world_size, sets, message):
    with pytest.raises(ConfigError) as caught:
        layout(world_size, *sets)
    assert message in str(caught.value)


def test_degrees_and_grid_axes_derive_from_the_layout():
    data = layout(3, "train.batch_size=48")
    assert data.axes == {"replica": 3} and data.batch_parts == 3 and data.model_device == "cpu"
    piped = layout(
        4, "parallel.mode='pipeline'", "parallel.stages=2", "parallel.replicas=2", "parallel.micro_batches=4"
    )
    assert piped.axes == {"replica": 2, "stage": 2} and piped.batch_parts == 8 and piped.model_device == "meta"
    tensor = layout(4, "parallel.mode='tensor'", "parallel.tensor=2", "parallel.replicas=2")
    assert tensor.axes == {"replica": 2, "tensor": 2} and tensor.model_device == "cpu"
    # Column mode never splits the batch: an odd batch on 2 ranks is fine (it was refused before).
    columns = layout(2, "parallel.mode='columns'", "train.batch_size=63")
    assert columns.axes == {"column": 2} and columns.batch_parts == 1


def test_model_and_data_rules():
    mlp = MLP(64, [16, 8], 10)
    with pytest.raises(ConfigError, match="only 3 layers with parameters .of 6.; use at most 3 stages"):
        Layout("pipeline", 4, stages=4).check_model(mlp)
    with pytest.raises(ConfigError, match=r"parallel.cuts = \[7\] must be 1 increasing layer indices in 1..5"):
        Layout("pipeline", 2, stages=2, cuts=(7,)).check_model(mlp)
    with pytest.raises(ConfigError, match=r"parallel.cuts = \[2\] leave stage 1 \(layers 0..1\) without parameters"):
        Layout("pipeline", 2, stages=2, cuts=(2,)).check_model(nn.Sequential(nn.Flatten(), nn.ReLU(), *list(mlp)[1:]))
    with pytest.raises(ConfigError, match="parallel.mode = 'pipeline' needs an nn.Sequential model"):
        Layout("pipeline", 2, stages=2).check_model(RNN((5, 3), "lstm", 4, 1, 2))
    with pytest.raises(ConfigError, match="hidden width 16 .layer 1. is not divisible by parallel.tensor = 3"):
        Layout("tensor", 3, tensor=3).check_model(mlp)
    with pytest.raises(ConfigError, match="layers Dropout between Linear 1 and 3 can't be split"):
        Layout("tensor", 2, tensor=2).check_model(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2))
        )
    with pytest.raises(ConfigError, match="parallel.mode = 'columns' needs model.name = 'mlp'"):
        Layout("columns", 2).check_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="splits 3 features over 4 ranks; use at most 3 ranks"):
        Layout("columns", 4).check_model(MLP(3, [4], 2))
    with pytest.raises(DataError, match="has 40 samples, fewer than one global batch of 64"):
        Layout("data", 2, replicas=2, batch_size=64).check_data(info(train=40))
    with pytest.raises(DataError, match="needs flat samples"):
        Layout("columns", 2).check_data(info(shape=(1, 8, 8)))
    Layout("tensor", 2, tensor=2).check_model(mlp)  # these fit: no error
    Layout("pipeline", 3, stages=3).check_model(mlp)


def test_agree_returns_the_result_or_ends_every_rank_with_one_line(capsys):
    world = comm.init(threads=1)  # one rank: the same code path as many, with a world of one
    assert world.agree(lambda: 41 + 1) == 42
    assert comm.init() is world  # one World per process
    with pytest.raises(SystemExit) as ended:
        world.agree(lambda: (_ for _ in ()).throw(HpcdlError("data.h5 is not HDF5")))
    assert ended.value.code == comm.EXIT_ERROR
    assert capsys.readouterr().err.strip() == "hpcdl: error: data.h5 is not HDF5"
    with pytest.raises(SystemExit):
        world.fail_all("replicas diverged")
    assert "hpcdl: error: replicas diverged" in capsys.readouterr().err


def test_grid_coordinates_are_row_major():
    world = comm.init(threads=1)
    grid = Grid(world, {"replica": 1, "stage": 1})
    assert grid.coords == {"replica": 0, "stage": 0} and grid.is_first_stage and grid.is_last_stage
    assert grid.size("tensor") == 1 and grid.coord("tensor") == 0
    with pytest.raises(ValueError, match="do not multiply"):
        Grid(world, {"replica": 2})


def test_buckets_are_grouped_by_dtype_in_backward_order():
    params = [
        nn.Parameter(torch.zeros(10, dtype=torch.float32)),
        nn.Parameter(torch.zeros(10, dtype=torch.float64)),
        nn.Parameter(torch.zeros(10, dtype=torch.float32)),
        nn.Parameter(torch.zeros(30, dtype=torch.float32)),
    ]
    groups = group_parameters(params, bucket_bytes=100)
    # Reverse order; float32 buckets cut at 100 bytes (the 120-byte one alone); float64 in its own bucket.
    position = {id(p): i for i, p in enumerate(params)}
    assert [[position[id(p)] for p in g] for g in groups] == [[3], [2, 0], [1]]
    assert all(len({p.dtype for p in g}) == 1 for g in groups)


def test_engine_sums_each_dtype_in_its_own_type_on_one_rank():
    world = comm.init(threads=1)
    linear64 = nn.Linear(3, 2).double()
    linear16 = nn.Linear(2, 2).to(torch.bfloat16)
    params = [*linear64.parameters(), *linear16.parameters()]
    engine = GradSync(world, params, bucket_bytes=2**20, scale=0.5)
    assert {b.flat.dtype for b in engine.buckets} == {torch.float64, torch.bfloat16}
    bf16 = next(b for b in engine.buckets if b.flat.dtype == torch.bfloat16)
    assert bf16.wire.dtype == torch.float32  # MPI cannot add bfloat16: summed in float32
    out = linear16(linear64(torch.ones(4, 3, dtype=torch.float64)).to(torch.bfloat16))
    out.float().sum().backward()
    expected = [p.grad.clone() * 0.5 for p in params]
    views = [p.grad.data_ptr() for p in params]
    engine.finish()
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want)
    assert [p.grad.data_ptr() for p in params] == views  # gradients stay views into their buckets
    assert engine.bytes_per_sync == 8 * 8 + 4 * 6  # 8 float64 values; 6 bfloat16 values travel as float32
    engine.zero()
    assert all(math.isclose(float(p.grad.abs().sum()), 0.0) for p in params)
