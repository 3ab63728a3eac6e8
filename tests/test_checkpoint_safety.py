"""Checkpoints are data, not code, and a save never loses anything (issue 17, findings 4 and 6)."""

from __future__ import annotations

import io
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdl import checkpoint
from hpcdl.errors import HpcdlError

from conftest import hpcdl_train

REFUSED = "is not an hpcdl checkpoint (it holds objects other than tensors and plain data: "


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """(a hostile checkpoint listed with a valid checksum in its manifest, the marker its code would create)."""
    marker = tmp_path / "code-ran"
    path = checkpoint.save(tmp_path / "crafted", 4, {"model": RunsCode(marker), "global_step": 4})
    assert checkpoint.problem(path) is None  # only the unpickling can stop it
    return path, marker


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 512 KiB tmpfs, unmounted afterwards: a real full disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.fail(f"cannot mount a tmpfs for the full-disk tests: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def small_state(step: int) -> dict:
    return {"model": {"w": torch.arange(1000.0)}, "global_step": step, "rng": checkpoint.rng_state()}


def assert_refused_without_running(stderr: str, marker: Path) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("hpcdl: error")]
    assert len(errors) == 1 and REFUSED in errors[0], stderr
    assert "Traceback" not in stderr, stderr
    assert not marker.exists(), "the checkpoint's code ran"


def test_load_refuses_a_checkpoint_that_runs_code(crafted):
    path, marker = crafted
    with pytest.raises(HpcdlError) as refused:
        checkpoint.load(path)
    message = str(refused.value)
    assert str(path) in message and REFUSED in message and "posix.system" in message
    assert "\n" not in message and "older hpcdl" in message
    assert not marker.exists(), "the checkpoint's code ran"


def test_checkpoint_info_refuses_a_checkpoint_that_runs_code(crafted):
    path, marker = crafted
    info = subprocess.run(
        [sys.executable, "-m", "hpcdl", "checkpoint", "info", str(path)], capture_output=True, text=True, timeout=60
    )
    assert info.returncode == 2, info.stderr
    assert_refused_without_running(info.stderr, marker)


def test_resume_refuses_a_checkpoint_that_runs_code_on_every_rank(crafted, datasets, tmp_path):
    path, marker = crafted
    result = hpcdl_train(
        2,
        "synthetic-mlp",
        f"data.path='{datasets['synthetic']}'",
        f"run.dir='{tmp_path / 'run'}'",
        extra=("--resume", str(path)),
        timeout=90,
    )
    assert result.returncode == 2, result.stderr
    assert_refused_without_running(result.stderr, marker)


def test_checkpoint_of_an_older_hpcdl_is_refused_saying_so(tmp_path):
    # Before issue 17 the numpy RNG state was a tuple holding an ndarray: not plain data.
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(HpcdlError, match=r"not an hpcdl checkpoint .*numpy.*written by an older hpcdl"):
        checkpoint.load(path)


def draws() -> list:
    """A few numbers from every generator a step may use, Gaussians included (numpy and Python cache one)."""
    return [
        torch.rand(4).tolist(),
        torch.randn(3).tolist(),
        np.random.rand(4).tolist(),
        np.random.randn(3).tolist(),
        [random.random() for _ in range(4)],
        [random.gauss(0, 1) for _ in range(3)],
    ]


def test_rng_round_trip_is_exact_and_loads_with_torch_defaults(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(1), random.gauss(0, 1)  # leave a cached Gaussian in numpy's and Python's state
    path = checkpoint.save(
        tmp_path, 7, {"model": {"w": torch.ones(3)}, "global_step": 7, "rng": checkpoint.rng_state()}
    )
    expected = draws()
    plain = torch.load(path)  # a user's plain load: torch's default is weights_only=True
    assert plain["global_step"] == 7 and plain["rng"]["numpy"]["has_gauss"] == 1
    checkpoint.restore_rng(checkpoint.load(path)["rng"])
    assert draws() == expected


def test_full_disk_loses_nothing(small_disk):
    first = checkpoint.save(small_disk, 1, small_state(1))
    too_big = {"model": {"w": torch.zeros(200_000)}, "global_step": 2}  # 800 kB on a 512 KiB disk
    with pytest.raises(HpcdlError) as failed:
        checkpoint.save(small_disk, 2, too_big, keep=1)
    message = str(failed.value)
    assert str(checkpoint.checkpoint_dir(small_disk) / "step-00000002.pt") in message, message
    assert "No space left on device (need about 0.8 MB, " in message and "move run.dir" in message, message
    assert_folder_holds_only(small_disk, first)


def test_full_disk_at_the_manifest_loses_nothing(small_disk):
    first = checkpoint.save(small_disk, 1, small_state(1))
    second = small_state(2)
    buffer = io.BytesIO()
    torch.save(second, buffer)
    # Leave room for the new checkpoint's pages exactly, none for the manifest written after it.
    page = os.statvfs(small_disk).f_frsize
    room = math.ceil(len(buffer.getvalue()) / page) * page
    free = os.statvfs(small_disk).f_bavail * page
    (small_disk / "filler").write_bytes(b"\0" * (free - room))
    with pytest.raises(HpcdlError, match=r"cannot write checkpoint manifest .*manifest.json: No space left on device"):
        checkpoint.save(small_disk, 2, second, keep=1)  # keep=1: the first would be pruned, had the save succeeded
    assert_folder_holds_only(small_disk, first)


def assert_folder_holds_only(run_dir: Path, kept: Path) -> None:
    """After a failed save: no partial file, the earlier checkpoint and its manifest as they were, and valid."""
    folder = checkpoint.checkpoint_dir(run_dir)
    assert sorted(p.name for p in folder.iterdir()) == [checkpoint.MANIFEST, kept.name]
    assert list(checkpoint.read_manifest(folder)) == [kept.name]
    assert checkpoint.newest_valid(run_dir) == kept
    assert checkpoint.load(kept)["global_step"] == 1


def test_check_space_refuses_with_figures(small_disk, tmp_path):
    with pytest.raises(HpcdlError, match=r"each takes about 0\.3 MB, 1\.6 MB needed, 0\.5 MB free; free space"):
        checkpoint.check_space(small_disk / "run", 300_000)
    checkpoint.check_space(tmp_path / "not" / "yet" / "made", 1_000)


def test_estimate_covers_an_adam_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 50)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state()}
    written = checkpoint.save(tmp_path, 1, {**state, "config": {"train": {"lr": 0.1}}}).stat().st_size
    estimate = checkpoint.estimate_bytes(model.state_dict(), optimizer_slots=2)
    assert written <= estimate <= 2 * written + 256_000, (written, estimate)


def test_save_weights_round_trips_into_a_plain_model(tmp_path):
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    path = checkpoint.save_weights(tmp_path, trained.state_dict())
    assert path == tmp_path / "model.pt" and not list(tmp_path.glob(".*partial"))
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    fresh.load_state_dict(torch.load(path))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))
