"""Runs every row of faults_table.CASES under mpiexec: the expected message, status and promptness."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest
import torch
from faults_table import CASES, Case

from hpcdl import checkpoint
from hpcdl.config import ModelConfig
from hpcdl.models import build

from conftest import run_watched

FEATURES, CLASSES = 20, 4  # the `synthetic` test dataset


def saved_run(run_dir: Path, hidden: list[int]) -> list[Path]:
    """Two checkpoints as training writes them, of an MLP with `hidden` layers."""
    model = build(ModelConfig(name="mlp", hidden=hidden), (FEATURES,), CLASSES, 0)
    optimizer = torch.optim.Adam(model.parameters())
    for step in (2, 4):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
        state.update(step_in_epoch=step, global_step=step, world_size=2, config={}, source="test")
        checkpoint.save(run_dir, step, state)
    return checkpoint.list_checkpoints(run_dir)


def all_corrupt(run_dir: Path, data: Path) -> Path:
    for path in saved_run(run_dir, [16]):
        os.truncate(path, path.stat().st_size - 7)
    return data


def other_model(run_dir: Path, data: Path) -> Path:
    saved_run(run_dir, [8])
    return data


def bad_manifest(run_dir: Path, data: Path) -> Path:
    saved_run(run_dir, [16])
    (checkpoint.checkpoint_dir(run_dir) / checkpoint.MANIFEST).write_text("{ not json")
    return data


def corrupt_chunk(run_dir: Path, data: Path) -> Path:
    """A copy of the data with fletcher32 checksums and one flipped byte in /train/x's first chunk."""
    broken = run_dir.parent / "broken.h5"
    with h5py.File(data, "r") as src, h5py.File(broken, "w") as dst:
        dst.attrs.update(src.attrs)
        for split in ("train", "val"):
            dst.create_dataset(f"{split}/x", data=src[f"{split}/x"][:], chunks=(30, FEATURES), fletcher32=True)
            dst[f"{split}/y"] = src[f"{split}/y"][:]
        offset = dst["train/x"].id.get_chunk_info(0).byte_offset
    with broken.open("r+b") as file:
        file.seek(offset + 100)
        byte = file.read(1)
        file.seek(offset + 100)
        file.write(bytes([byte[0] ^ 0xFF]))
    return broken


SETUPS = {"all corrupt": all_corrupt, "other model": other_model, "bad manifest": bad_manifest}
SETUPS["corrupt chunk"] = corrupt_chunk


def command(case: Case, data: Path, run_dir: Path) -> list[str]:
    """`hpcdl train` with the table's options on a small config: 2 epochs of 17 steps."""
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1"]
    sets = [f"data.path='{data}'", f"run.dir='{run_dir}'", "model.hidden=[16]", "train.batch_size=32"]
    sets += ["train.epochs=2", "run.progress=false"]
    options = list(case.args)
    while options:
        item = options.pop(0)
        if item.startswith("--"):
            args += [item, options.pop(0)]
        else:
            sets.append(item)
    for assignment in sets:
        args += ["--set", assignment]
    return args


def test_table_covers_every_fault_kind():
    from hpcdl.faults import KINDS

    tried = {arg.split("@")[0] for case in CASES for arg in case.args if "@" in arg}
    assert set(KINDS) - {"stall"} <= tried  # stall only gives time for a signal (test_reliability)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fault(case: Case, datasets, tmp_path):
    run_dir = tmp_path / "run"
    data = datasets["synthetic"]
    if case.setup:
        data = SETUPS[case.setup](run_dir, data)
    status, stdout, stderr, seconds = run_watched(case.ranks, command(case, data, run_dir), "hpcdl: fault: injecting")
    if case.status is None:
        assert status != 0, f"expected a failure, got success:\n{stdout}"
    else:
        assert status == case.status, f"status {status}, expected {case.status}:\n{stdout}\n{stderr}"
    assert case.message in stdout + stderr, f"expected {case.message!r} in:\n{stdout}\n{stderr}"
    if case.within_s is not None:
        assert seconds is not None and seconds < case.within_s, f"ended {seconds} s after the fault"
    if case.clean:
        errors = [line for line in stderr.splitlines() if line.startswith("hpcdl: error")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        assert not (run_dir / "metrics.jsonl").exists(), "a run that failed to start must write nothing"
        if not case.setup:
            assert not run_dir.exists(), "a run that failed to start must leave no run folder"
