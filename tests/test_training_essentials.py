"""Regression and custom losses, schedules, clipping, mixed precision, early stopping, step records and fit's
own parts: each against one process (tests/reference.py) in the modes that split the model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcdl import checkpoint
from hpcdl.config import ModelConfig
from hpcdl.data.make import make_diabetes
from hpcdl.models import build

from conftest import REPO, hpcdl_train, read_summary, reference_sets, run_mpi
from reference import assert_close_states, reference_train

MODEL = ModelConfig(name="mlp", hidden=[16, 12, 8])
STEPS, BATCH, LR = 12, 48, 0.05
MODES = {
    "data": (),
    "pipeline": ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.micro_batches=4"),
    "tensor": ("parallel.mode='tensor'", "parallel.tensor=2"),
    "columns": ("parallel.mode='columns'",),
}


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    """scikit-learn's diabetes set as an hpcdl regression file (354 train / 88 val, scalar targets)."""
    path = tmp_path_factory.mktemp("regression") / "diabetes.h5"
    make_diabetes(path)
    return path


def train(ranks: int, data, run_dir, *sets: str, steps: int = STEPS, extra: tuple[str, ...] = (), env=None):
    """`hpcdl train` of the reference's model, batch, steps and SGD, plus `sets`."""
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1", *extra]
    for assignment in (*reference_sets(data, run_dir, MODEL.hidden, BATCH, steps, LR), *sets):
        args += ["--set", assignment]
    result = run_mpi(ranks, *args, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    return result


def final_model(run_dir) -> dict:
    return checkpoint.load(checkpoint.resolve("latest", run_dir))["model"]


# A custom loss as a user writes one (the mean over samples of the 0.7-quantile loss), in a module of its own.
MY_LOSSES = """
import torch


def pinball(outputs, targets):
    error = targets - outputs
    return torch.maximum(0.7 * error, -0.3 * error).mean()
"""
pinball = {}
exec(compile(MY_LOSSES, "my_losses.py", "exec"), pinball)
pinball = pinball["pinball"]


@pytest.mark.parametrize("ranks", [3])
def test_regression_equals_one_process_and_metrics_equal_numpy(diabetes, tmp_path, ranks):
    train(ranks, diabetes, tmp_path / "mse")  # the task's default loss: mse
    expected = reference_train(diabetes, MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR, loss_fn=F.mse_loss)
    state = final_model(tmp_path / "mse")
    assert_close_states(state, expected)

    # The run's validation metrics are NumPy's on the final model's predictions.
    with h5py.File(diabetes) as f:
        x, y = f["val/x"][:], f["val/y"][:].astype(np.float64)
    model = build(MODEL, (10,), 1, seed=0)
    model.load_state_dict(state)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).numpy()[:, 0].astype(np.float64)
    summary = read_summary(tmp_path / "mse")
    error = predicted - y
    assert summary["val_rmse"] == pytest.approx(math.sqrt(np.mean(error**2)), rel=1e-5)
    assert summary["val_mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-5)
    assert summary["val_r2"] == pytest.approx(1 - np.sum(error**2) / np.sum((y - y.mean()) ** 2), rel=1e-5)
    assert summary["val_loss"] == pytest.approx(np.mean(error**2), rel=1e-5)

    # A custom loss, named as module:function (found on PYTHONPATH).
    (tmp_path / "my_losses.py").write_text(MY_LOSSES)
    env = {"PYTHONPATH": str(tmp_path)}
    train(ranks, diabetes, tmp_path / "own", "train.loss='my_losses:pinball'", env=env)
    expected = reference_train(diabetes, MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR, loss_fn=pinball)
    assert_close_states(final_model(tmp_path / "own"), expected)


def test_diabetes_config_beats_predicting_the_mean(diabetes, tmp_path):
    # One rank trains what two would (the same global batch): the config's quality needs no second process.
    run_dir = tmp_path / "run"
    result = hpcdl_train(1, "diabetes-mlp", f"data.path='{diabetes}'", f"run.dir='{run_dir}'", "run.progress=false")
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert summary["val_r2"] > 0.3, summary  # predicting the train mean scores about 0 (the targets are standardized)


def cosine_with_warmup(warmup: int, total: int):
    """torch's own schedulers for train.schedule = 'cosine' with lr_warmup_steps = warmup: an independent oracle."""

    def make(optimizer):
        rise = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / (warmup + 1), 1.0, total_iters=warmup)
        fall = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [rise, fall], milestones=[warmup])

    return make


@pytest.mark.parametrize("mode", sorted(MODES))
def test_schedule_and_clipping_equal_one_process_in_every_mode(datasets, tmp_path, mode):
    sets = ("train.schedule='cosine'", "train.lr_warmup_steps=3", "train.clip_grad_norm=0.05", *MODES[mode])
    train(2, datasets["synthetic"], tmp_path, *sets)
    expected = reference_train(
        datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR,
        scheduler=cosine_with_warmup(3, STEPS), clip_grad_norm=0.05,
    )  # fmt: skip
    assert_close_states(final_model(tmp_path), expected)
    # The clip was active: the norms logged before clipping exceed it.
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0.05 for r in steps if r["event"] == "step")


@pytest.mark.parametrize(("mode", "precision"), [("data", "bf16"), ("pipeline", "bf16"), ("tensor", "bf16"),
                                                 ("data", "fp16")])  # fmt: skip
def test_mixed_precision_matches_fp32_within_tolerance(datasets, tmp_path, mode, precision):
    train(2, datasets["synthetic"], tmp_path, f"train.precision='{precision}'", *MODES[mode])
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR)
    # bf16 keeps 8 bits of mantissa, fp16 11: after 12 steps the weights stay within a few 1e-3 of fp32's.
    assert_close_states(final_model(tmp_path), expected, atol=2e-2, rtol=0)
    if precision == "fp16":
        state = checkpoint.load(checkpoint.resolve("latest", tmp_path))
        assert state["loss_scale"]["enabled"] and state["loss_scale"]["scale"] >= 1.0


def test_resume_with_a_schedule_is_bitwise_equal(datasets, tmp_path):
    sets = ("train.schedule='onecycle'", "train.clip_grad_norm=0.5")
    train(2, datasets["synthetic"], tmp_path / "whole", *sets)
    # Stopped by a signal after step 6 (checkpoint, exit 75), then resumed: the same config, so the same horizon.
    with pytest.raises(AssertionError, match="stopped by SIGUSR1 at step 6"):
        train(2, datasets["synthetic"], tmp_path / "parts", *sets, extra=("--fault", "signal@0:6"))
    train(2, datasets["synthetic"], tmp_path / "parts", *sets, extra=("--resume",))
    whole, parts = read_summary(tmp_path / "whole"), read_summary(tmp_path / "parts")
    assert parts["param_digests"] == whole["param_digests"] and parts["step"] == STEPS


def test_early_stop_at_the_expected_epoch_keeps_the_best_checkpoint(datasets, tmp_path):
    # Training loss falls every epoch, so watched with mode "max" epoch 1 stays the best: patience 2 ends epoch 3.
    stop = "run.early_stop={metric = 'loss', mode = 'max', patience = 2}"
    result = train(1, datasets["synthetic"], tmp_path / "run", stop, "run.keep_best=true", steps=0)
    assert "early stop after epoch 3: loss has not improved for 2 epochs" in result.stdout, result.stdout
    summary = read_summary(tmp_path / "run")
    assert summary["stopped_early"] and summary["best_epoch"] == 1 and summary["epoch"] == 3
    train(1, datasets["synthetic"], tmp_path / "one", "train.epochs=1", steps=0)
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["epoch"] == 1
    assert_close_states(best["model"], final_model(tmp_path / "one"), atol=0, rtol=0)
    # best.pt is a checkpoint like any other for export (and infer/evaluate), though the manifest does not list it.
    out = tmp_path / "best.safetensors"
    exported = subprocess.run(
        [sys.executable, "-m", "hpcdl", "export", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert exported.returncode == 0 and out.is_file(), exported.stderr


@pytest.fixture(scope="module")
def logged(datasets, tmp_path_factory):
    """One rank, 2 epochs, logging every 2 steps to TensorBoard too, a step schedule, and the old name of
    run.timing_skip_steps; its folder and its result (the tests below only read them)."""
    run_dir = tmp_path_factory.mktemp("logged")
    sets = ("run.log_every=2", "run.tensorboard=true", "train.schedule='step'", "train.lr_step_every=4")
    result = train(1, datasets["synthetic"], run_dir, *sets, "run.warmup_steps=2", "train.epochs=2", steps=0)
    return run_dir, result


def test_step_records_csv_and_tensorboard(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = logged
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in steps][:3] == [2, 4, 6]
    # optimizer step k (from 1) is taken with 0.05 x 0.1^((k - 1) // 4)
    assert [r["lr"] for r in steps][:5] == pytest.approx([LR, LR, LR * 0.1, LR * 0.1, LR * 0.01])
    assert all(r["grad_norm"] > 0 and r["samples_per_s"] > 0 and "acc" in r for r in steps)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,loss,acc,val_loss,val_acc") and len(rows) == 1 + len(epochs) == 3
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("epoch/val_loss")) == len(epochs)
    assert [s.step for s in events.Scalars("step/lr")] == [r["step"] for r in steps]


def test_fit_takes_own_loss_optimizer_scheduler_and_callbacks(datasets, tmp_path):
    script = REPO / "tests" / "scripts" / "fit_parts.py"
    result = run_mpi(2, str(script), str(datasets["synthetic"]), str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = reference_train(
        datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR, momentum=0.0,
        loss_fn=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1),
        scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5),
    )  # fmt: skip
    assert_close_states(final_model(tmp_path), expected)
    seen = json.loads((tmp_path / "callbacks-rank1.json").read_text())
    assert seen == {"steps": [3, 6, 9, 12], "epochs": [1.0]}  # 540 rows / 48: the 12 steps are one epoch


def test_old_timing_key_still_works_and_says_so(logged):
    run_dir, result = logged
    assert "run.warmup_steps is now run.timing_skip_steps (the old name still works)" in result.stdout
    assert read_summary(run_dir)["timing_skip_steps"] == 2


def test_regression_loss_on_classes_is_refused_in_one_line(datasets, tmp_path):
    result = run_mpi(
        2, "-m", "hpcdl", "train", "--config", "digits-mlp", "--set", f"data.path='{datasets['synthetic']}'",
        "--set", f"run.dir='{tmp_path}'", "--set", "train.loss='mse'",
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("hpcdl: error") and "train.loss = 'mse' is for regression" in lines[0], lines
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()
