"""Every user error is one line naming what is wrong (config keys, library arguments, data), never a traceback."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import get_args, get_origin, get_type_hints

import h5py
import numpy as np
import pytest

from hpcdl import config
from hpcdl.data import make
from hpcdl.errors import ConfigError
from hpcdl.metrics import JsonlLog, strict_json

from conftest import REPO, assert_one_line, hpcdl_train, run_mpi

# ---- config: every numeric key is held to the Range its field declares ----------------------------------------

# Numeric keys checked elsewhere than by a declared Range, and where.
CHECKED_ELSEWHERE = {
    "run.watchdog_s": "'auto' or seconds: RunConfig.check",
    "parallel.cuts": "against the model's layers: parallel.layout",
    "distill.alpha": "within [0, 1], both ends included: DistillConfig.check (tests/test_distill.py)",
    "prune.start": "'auto' or a step: PruneConfig.check",
    "prune.end": "'auto' or a step: PruneConfig.check",
}


@dataclasses.dataclass(frozen=True)
class NumericKey:
    """A config key holding a number (or a list of numbers), and the Range its field declares."""

    key: str
    kind: type  # int or float
    is_list: bool
    limits: config.Range | None

    def toml(self, value: float) -> str:
        """`value` as this key's TOML literal (nan, inf, -inf for the non-finite)."""
        text = str(value).lower() if isinstance(value, float) and not math.isfinite(value) else repr(value)
        return f"[{text}]" if self.is_list else text


def numeric_keys() -> list[NumericKey]:
    found = []
    for section in config.SECTIONS:
        cls = type(getattr(config.Config(), section))
        hints = get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            kinds = [kind for kind in (hints[spec.name], *get_args(hints[spec.name])) if kind in (int, float)]
            if kinds:
                is_list = get_origin(hints[spec.name]) is list
                found.append(NumericKey(f"{section}.{spec.name}", kinds[0], is_list, spec.metadata.get("range")))
    return found


def bad_values(number: NumericKey) -> list[float]:
    """Values just outside the key's Range (and NaN/Inf for floats): each one must be refused."""
    limits = number.limits
    values = [limits.low if limits.open_low else limits.low - (1 if number.kind is int else 0.5)]
    if limits.high is not None:
        values.append(limits.high)
    if number.kind is float:
        values += [math.nan, math.inf, -math.inf]
    return values


RANGED = [number for number in numeric_keys() if number.limits]
OUT_OF_RANGE = [
    pytest.param(number.key, number.toml(value), id=f"{number.key}={number.toml(value)}")
    for number in RANGED
    for value in bad_values(number)
]
EDGES = [
    pytest.param(number.key, number.toml(number.limits.low), id=f"{number.key}={number.toml(number.limits.low)}")
    for number in RANGED
    if not number.limits.open_low
]


def test_every_numeric_key_declares_its_range():
    unchecked = [number.key for number in numeric_keys() if number.limits is None]
    assert sorted(unchecked) == sorted(CHECKED_ELSEWHERE), "declare a Range with config.number/numbers"


@pytest.mark.parametrize("key, value", OUT_OF_RANGE)
def test_out_of_range_names_the_key(key, value):
    with pytest.raises(ConfigError) as caught:
        config.load("digits-mlp", [f"{key}={value}"])
    message = str(caught.value)
    assert message.startswith(f"config: {key}") and "must be" in message and "\n" not in message, message


def where_read(key: str) -> list[str]:
    """The setting under which a key is read at all (its read_when), e.g. parallel.mode='zero' for zero_stage."""
    section, name = key.split(".")
    spec = next(f for f in dataclasses.fields(getattr(config.Config(), section)) if f.name == name)
    read = spec.metadata.get("read_when")
    return [f"{read.settings[0]}={read.values[0]!r}"] if read and read.values else []


@pytest.mark.parametrize("key, value", EDGES)
def test_range_edges_are_accepted(key, value):
    config.load("digits-mlp", [*where_read(key), f"{key}={value}"])


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("train.lr=nan", "config: train.lr must be a finite number > 0, got nan"),
        ("train.lr=0", "config: train.lr must be a finite number > 0, got 0.0"),
        ("train.momentum=-0.1", "config: train.momentum must be a finite number >= 0, got -0.1"),
        ("train.weight_decay=inf", "config: train.weight_decay must be a finite number >= 0, got inf"),
        ("train.seed=-1", "config: train.seed must be >= 0 and < 4294967296, got -1"),
        ("train.seed=4294967296", "config: train.seed must be >= 0 and < 4294967296, got 4294967296"),
        ("data.cache_mb=inf", "config: data.cache_mb must be a finite number >= 0, got inf"),
        ("parallel.bucket_mb=nan", "config: parallel.bucket_mb must be a finite number > 0, got nan"),
        ("model.hidden=[64, 0]", "config: model.hidden[1] must be a positive integer, got 0"),
        ("run.check_every=-5", "config: run.check_every must be >= 0 (0 turns the check off), got -5"),
        ("run.watchdog_s=nan", "config: run.watchdog_s must be >= 0 seconds (0 turns the watchdog off) or 'auto'"),
        ("train.epochs=true", "config: train.epochs must be int, got True"),
        ("parallel.bucket_mb=false", "config: parallel.bucket_mb must be float, got False"),
    ],
)
def test_messages(assignment, message):
    with pytest.raises(ConfigError) as caught:
        config.load("digits-mlp", [assignment])
    assert str(caught.value).startswith(message)


def test_momentum_of_one_or_more_is_torchs_to_judge():
    """torch's SGD takes momentum >= 1, so the config does not refuse it."""
    assert config.load("digits-mlp", ["train.optimizer='sgd'", "train.momentum=1.5"]).train.momentum == 1.5


@pytest.mark.parametrize(
    "assignment, key",
    [
        ("train.lr=nan", "train.lr"),
        ("train.momentum=-0.5", "train.momentum"),
        ("train.seed=4294967296", "train.seed"),
        ("parallel.bucket_mb=inf", "parallel.bucket_mb"),
    ],
)
def test_command_line_says_one_line(tmp_path, assignment, key):
    result = hpcdl_train(1, "digits-mlp", assignment, f"run.dir='{tmp_path / 'run'}'", timeout=60)
    assert_one_line(result, f"config: {key} must be")
    assert not (tmp_path / "run").exists()


# ---- library calls: checked on every rank before the first collective ----------------------------------------

LIBRARY_CALLS = {  # the case in tests/scripts/bad_library_calls.py -> what its one line says
    "DataParallel module": "hpcdl.DataParallel: module must be a torch.nn.Module, got list",
    "DataParallel bucket_mb nan": "hpcdl.DataParallel: bucket_mb must be a finite number > 0, got nan",
    "DataParallel bucket_mb 0": "hpcdl.DataParallel: bucket_mb must be a finite number > 0, got 0",
    "DataParallel compression": "hpcdl.DataParallel: compression = 'zip' is not one of none, fp16, bf16",
    "DataParallel overlap": "hpcdl.DataParallel: overlap must be True or False, got 'yes'",
    "DataParallel average": "hpcdl.DataParallel: average must be True or False, got 1",
    "fit model": "hpcdl.fit: model must be a torch.nn.Module, got NoneType",
    "fit data_path": "hpcdl.fit: data_path must be a path (str or pathlib.Path), got 3",
    "fit lr": "config: train.lr must be a finite number > 0, got nan",
    "fit model without parameters": "hpcdl.fit: model Flatten has no parameters that require gradients: nothing to "
    "train; pass the network with its layers (e.g. nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))",
    "open path": "hpcdl.data.open: path must be a path (str or pathlib.Path), got None",
    "open split": "hpcdl.data.open: split = 'test' is not one of train, val",
    "open seed": "hpcdl.data.open: seed must be >= 0 and < 4294967296, got -1",
    "open shuffle": "hpcdl.data.open: shuffle must be True or False, got 'yes'",
    "open prefetch": "hpcdl.data.open: prefetch must be >= 0, got -1",
    "open cache_mb": "hpcdl.data.open: cache_mb must be a finite number >= 0, got inf",
    "open window_blocks": "hpcdl.data.open: window_blocks must be a positive integer, got 0",
}
SCRIPT = str(REPO / "tests" / "scripts" / "bad_library_calls.py")


def test_bad_library_arguments_end_every_rank():
    """One launch of 2 ranks tries every call: each ends both ranks with status 2 and says one line."""
    result = run_mpi(2, SCRIPT, *LIBRARY_CALLS, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{case} 2 2" for case in LIBRARY_CALLS], result.stdout
    assert result.stderr.splitlines() == [f"hpcdl: error: {line}" for line in LIBRARY_CALLS.values()]


def test_a_bad_argument_is_the_launchers_exit_status():
    case = "DataParallel bucket_mb nan"
    assert_one_line(run_mpi(2, SCRIPT, case, timeout=60), LIBRARY_CALLS[case])


# ---- data problems named ---------------------------------------------------------------------------------------


def test_train_refuses_nan_in_val(tmp_path):
    """Not val_loss=nan and exit 0: the run does not start."""
    path = make.make_synthetic(tmp_path / "val.h5", n=300, features=8, classes=3, progress=False).path
    with h5py.File(path, "r+") as f:
        f["val/x"][3, 0] = np.nan
    result = hpcdl_train(1, "digits-mlp", f"data.path='{path}'", f"run.dir='{tmp_path / 'run'}'", timeout=60)
    assert_one_line(result, "first NaN in sample 3 of split '/val'")


# ---- strict JSON -----------------------------------------------------------------------------------------------


def refuse_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def test_strict_json_writes_null_and_names_the_keys():
    record = {"val_loss": math.nan, "ms_per_step": {"comm": math.inf}, "losses": [1.0, -math.inf], "steps": 3}
    parsed = json.loads(strict_json(record, indent=2), parse_constant=refuse_constant)
    assert parsed == {
        "val_loss": None,
        "ms_per_step": {"comm": None},
        "losses": [1.0, None],
        "steps": 3,
        "nonfinite": {"val_loss": "nan", "ms_per_step.comm": "inf", "losses[1]": "-inf"},
    }
    assert "nonfinite" not in json.loads(strict_json({"val_loss": 0.5}))


def test_metrics_log_is_strict_json(tmp_path):
    JsonlLog(tmp_path / "metrics.jsonl").write(event="epoch", val_loss=math.nan)
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=refuse_constant)
    assert record["val_loss"] is None and record["nonfinite"] == {"val_loss": "nan"}
