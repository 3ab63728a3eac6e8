"""A run folder belongs to one run: no fresh start over a run, --overwrite moves it aside, a lock against a
second live run, a resume with a changed config continues exactly or refuses, a complete run says so."""

import hashlib
import os

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from hpcdl import checkpoint, rundir
from hpcdl.config import ModelConfig
from hpcdl.models import build

from conftest import hpcdl_train
from reference import assert_close_states

MODEL = ModelConfig(name="mlp", hidden=[16])
LR = 0.05


def train(ranks, data, run_dir, *sets, extra=()):
    return hpcdl_train(
        ranks, "synthetic-mlp", f"data.path='{data}'", f"run.dir='{run_dir}'", "model.hidden=[16]",
        f"train.lr={LR}", "train.epochs=50", "run.progress=false", "run.watchdog_s=0", *sets, extra=extra,
    )  # fmt: skip


def fingerprint(folder):
    """Every file under `folder` with its SHA-256: equal fingerprints mean nothing was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpcdl: error")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_a_fresh_start_never_buries_a_run_and_overwrite_moves_it_aside(datasets, tmp_path):
    data, run_dir = datasets["synthetic"], tmp_path / "run"
    assert train(2, data, run_dir, "train.max_steps=4").returncode == 0
    before = fingerprint(run_dir)
    again = train(2, data, run_dir, "train.max_steps=2")
    one_line_error(again, "already holds a run", "--resume auto", "--overwrite")
    assert fingerprint(run_dir) == before  # nothing touched, nothing deleted

    moved = train(2, data, run_dir, "train.max_steps=2", extra=("--overwrite",))
    assert moved.returncode == 0, moved.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and "moves to" in moved.stdout
    assert {k: v for k, v in fingerprint(aside[0]).items() if k != rundir.LOCK} == {
        k: v for k, v in before.items() if k != rundir.LOCK
    }
    assert checkpoint.load(checkpoint.resolve("latest", run_dir))["global_step"] == 2


def test_logs_of_a_run_killed_before_its_first_checkpoint_are_never_appended_to(datasets, tmp_path):
    data, run_dir = datasets["synthetic"], tmp_path / "run"
    run_dir.mkdir()
    old_line = '{"event": "step", "step": 1, "loss": 9.0}\n'
    (run_dir / "metrics.jsonl").write_text(old_line)  # a run killed at step 2: logs, no checkpoint
    before = fingerprint(run_dir)
    refused = train(1, data, run_dir, "train.max_steps=2")
    one_line_error(refused, "already holds a run that ended before its first checkpoint (metrics.jsonl)", "--overwrite")
    assert fingerprint(run_dir) == before

    restarted = train(1, data, run_dir, "train.max_steps=2", extra=("--resume", "auto"))  # a requeued job
    assert restarted.returncode == 0, restarted.stderr
    assert "--resume auto: no checkpoint to continue, so the run starts over" in restarted.stdout
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert fingerprint(aside) == before
    assert old_line not in (run_dir / "metrics.jsonl").read_text()


def test_a_live_run_holds_the_folder(datasets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = rundir.RunLock(run_dir)
    lock.acquire()  # this test process is the live run
    try:
        result = train(2, datasets["synthetic"], run_dir, "train.max_steps=2")
        one_line_error(result, "in use by another run", f"pid {os.getpid()}")
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        lock.release()
    assert train(1, datasets["synthetic"], run_dir, "train.max_steps=2").returncode == 0  # free once released


def test_every_path_is_checked_before_the_first_step(datasets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    result = train(2, datasets["synthetic"], run_dir, "train.max_steps=2")
    one_line_error(result, "checkpoints is a file, not a folder")
    assert not (run_dir / "metrics.jsonl").exists()  # refused up front: nothing trained, nothing logged


def reference_with_batches(path, seed, batches):
    """SGD in one process over consecutive slices of epoch 0's order: `batches` gives each step's size."""
    with h5py.File(path) as f:
        x, y = torch.from_numpy(f["train/x"][:]), torch.from_numpy(f["train/y"][:])
        classes = int(f.attrs["num_classes"])
    model = build(MODEL, tuple(x.shape[1:]), classes, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    order, start = np.random.default_rng([seed, 0]).permutation(len(y)), 0
    for size in batches:
        chunk = torch.from_numpy(order[start : start + size])
        optimizer.zero_grad()
        F.cross_entropy(model(x[chunk]), y[chunk]).backward()
        optimizer.step()
        start += size
    return model.state_dict()


def test_resume_with_a_changed_batch_size_continues_exactly_or_refuses(datasets, tmp_path):
    data, run_dir = datasets["synthetic"], tmp_path / "run"
    assert train(2, data, run_dir, "train.batch_size=16", "train.max_steps=4").returncode == 0  # 64 samples
    saved = fingerprint(run_dir / "checkpoints")

    refused = train(2, data, run_dir, "train.batch_size=24", "train.max_steps=6", extra=("--resume", "auto"))
    one_line_error(refused, "train.batch_size changed 16 -> 24", "after 64 samples")
    assert fingerprint(run_dir / "checkpoints") == saved

    # 64 samples are two batches of 32: the run continues at sample 64 with the new size, exactly.
    resumed = train(2, data, run_dir, "train.batch_size=32", "train.max_steps=6", extra=("--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with train.batch_size changed: 16 -> 32" in resumed.stdout
    state = checkpoint.load(checkpoint.resolve("latest", run_dir))
    assert state["global_step"] == 6 and state["step_in_epoch"] == 4
    assert_close_states(state["model"], reference_with_batches(data, 0, [16] * 4 + [32] * 2))


def test_resume_says_what_changed_refuses_what_changes_the_meaning_and_a_complete_run_says_so(datasets, tmp_path):
    data, run_dir = datasets["synthetic"], tmp_path / "run"
    assert train(1, data, run_dir, "train.max_steps=3").returncode == 0
    other_model = train(1, data, run_dir, "train.max_steps=4", "model.hidden=[8]", extra=("--resume", "auto"))
    one_line_error(other_model, "model.hidden", "start a new run.dir")
    other_seed = train(1, data, run_dir, "train.max_steps=4", "train.seed=3", extra=("--resume", "auto"))
    one_line_error(other_seed, "train.seed")

    done = train(1, data, run_dir, "train.max_steps=3", extra=("--resume", "auto"))
    assert done.returncode == 0, done.stderr
    assert "already complete" in done.stdout and "0 steps" not in done.stdout

    slower = train(1, data, run_dir, "train.max_steps=5", "train.lr=0.01", extra=("--resume", "auto"))
    assert slower.returncode == 0, slower.stderr
    assert "resuming with train.lr changed: 0.05 -> 0.01" in slower.stdout
    assert checkpoint.load(checkpoint.resolve("latest", run_dir))["global_step"] == 5
    assert (run_dir / "config.toml").read_text().count("lr = 0.01") == 1  # the config of the run as it goes on


def test_resume_from_a_moved_dataset_checks_it_is_the_same_data(datasets, tmp_path):
    data, run_dir = datasets["synthetic"], tmp_path / "run"
    assert train(1, data, run_dir, "train.max_steps=2").returncode == 0
    moved = tmp_path / "scratch" / "same.h5"
    moved.parent.mkdir()
    moved.write_bytes(data.read_bytes())  # the same file after a move (e.g. a purged scratch space)
    other = datasets["digits"]
    refused = train(1, other, run_dir, "train.max_steps=4", extra=("--resume", "auto"))
    one_line_error(refused, "data.path now names other data", "start a new run.dir")
    resumed = train(1, moved, run_dir, "train.max_steps=4", extra=("--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with data.path changed" in resumed.stdout
    assert checkpoint.load(checkpoint.resolve("latest", run_dir))["global_step"] == 4
