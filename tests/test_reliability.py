"""Nothing lost: a killed rank, SIGTERM/SIGUSR1, corrupt checkpoints, elastic resume, NaN skip.

Every interrupted run is continued with `--resume auto` and compared with one uninterrupted
4-rank run: bitwise at the same scale, within float tolerance at another scale.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from hpcdl import checkpoint, cli
from hpcdl.comm import EXIT_REQUEUE

from conftest import hpcdl_train, read_summary, run_watched
from reference import assert_close_states

RANKS = 4
STEPS_PER_EPOCH = 17  # 540 training samples of `synthetic`, global batch 32
LAST_STEP = 2 * STEPS_PER_EPOCH


def settings(datasets, run_dir: Path) -> tuple[str, ...]:
    return (
        f"data.path='{datasets['synthetic']}'",
        f"run.dir='{run_dir}'",
        "model.hidden=[16]",
        "train.batch_size=32",
        "train.epochs=2",
        "train.optimizer='adam'",
        "run.checkpoint_every=4",
        "run.progress=false",
    )


def train_args(datasets, run_dir: Path, *extra: str) -> list[str]:
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1", "--resume", "auto"]
    for assignment in settings(datasets, run_dir):
        args += ["--set", assignment]
    return [*args, *extra]


def checkpoint_info(capsys, run_dir: Path) -> str:
    """`hpcdl checkpoint info RUN_DIR`'s output, run in this process (it needs no launcher)."""
    status = cli.main(["checkpoint", "info", str(run_dir)])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


def final_digest(run_dir: Path) -> str:
    digests = read_summary(run_dir)["param_digests"]
    assert len(set(digests)) == 1, "ranks' parameters differ"
    return digests[0]


@pytest.fixture(scope="module")
def baseline(datasets, tmp_path_factory) -> Path:
    """The uninterrupted 4-rank run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("baseline")
    result = hpcdl_train(RANKS, "digits-mlp", *settings(datasets, run_dir), extra=("--resume", "auto"), timeout=240)
    assert result.returncode == 0, result.stderr
    assert "resumed" not in result.stdout, "--resume auto with no checkpoint starts fresh"
    assert read_summary(run_dir)["step"] == LAST_STEP
    return run_dir


@pytest.fixture(scope="module")
def killed(datasets, tmp_path_factory) -> tuple[Path, Path, float, int, str]:
    """A 4-rank run whose rank 2 is SIGKILLed at step 10 (checkpoints at steps 4 and 8)."""
    run_dir = tmp_path_factory.mktemp("killed")
    status, _, stderr, seconds = run_watched(
        RANKS, train_args(datasets, run_dir, "--fault", "kill@2:10"), "injecting kill"
    )
    snapshot = tmp_path_factory.mktemp("killed-snapshot") / "run"
    shutil.copytree(run_dir, snapshot)
    return run_dir, snapshot, seconds, status, stderr


def test_killed_rank_ends_job_and_resume_is_bitwise(datasets, baseline, killed):
    run_dir, _, seconds, status, stderr = killed
    assert status != 0, stderr
    assert seconds < 15, f"the job took {seconds:.1f} s to end after rank 2 was killed"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000004.pt", "step-00000008.pt"]
    result = hpcdl_train(RANKS, "digits-mlp", *settings(datasets, run_dir), extra=("--resume", "auto"), timeout=240)
    assert result.returncode == 0, result.stderr
    assert "resumed at step 8" in result.stdout
    assert final_digest(run_dir) == final_digest(baseline)


def test_sigterm_and_sigusr1_checkpoint_exit_75_and_resume_bitwise(datasets, baseline, tmp_path):
    run_dir = tmp_path / "run"
    # SIGTERM to mpiexec reaches every rank while rank 1 stalls in step 13 (the others wait in its collective).
    status, stdout, stderr, _ = run_watched(
        RANKS,
        train_args(datasets, run_dir, "--fault", "stall@1:13"),
        "injecting stall",
        on_marker=lambda proc: proc.send_signal(signal.SIGTERM),
    )
    assert status == EXIT_REQUEUE, stderr
    expected = f"hpcdl: stopped by SIGTERM at step 13; checkpoint {run_dir}/checkpoints/step-00000013.pt;"
    assert expected in stdout, stdout + stderr
    # SIGUSR1 on rank 3 only (as a forwarded `scancel --signal=USR1` may arrive): every rank stops at step 20.
    result = hpcdl_train(
        RANKS, "digits-mlp", *settings(datasets, run_dir), extra=("--resume", "auto", "--fault", "signal@3:20")
    )
    assert result.returncode == EXIT_REQUEUE, result.stderr
    assert "resumed at step 13" in result.stdout
    assert "stopped by SIGUSR1 at step 20" in result.stdout
    result = hpcdl_train(RANKS, "digits-mlp", *settings(datasets, run_dir), extra=("--resume", "auto"), timeout=240)
    assert result.returncode == 0, result.stderr
    assert final_digest(run_dir) == final_digest(baseline)


def test_corrupt_newest_checkpoint_falls_back(datasets, baseline, tmp_path, capsys):
    # The baseline kept steps 28, 32 and 34; cut the newest short: resume uses 32 and redoes 2 steps.
    run_dir = tmp_path / "run"
    shutil.copytree(baseline, run_dir)
    newest = checkpoint.checkpoint_dir(run_dir) / f"step-{LAST_STEP:08d}.pt"
    os.truncate(newest, newest.stat().st_size // 2)
    result = hpcdl_train(RANKS, "digits-mlp", *settings(datasets, run_dir), extra=("--resume", "auto"), timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"step-{LAST_STEP:08d}.pt is not valid (truncated or extended" in result.stdout
    assert "using the previous one, step-00000032.pt" in result.stdout
    assert "resumed at step 32" in result.stdout
    assert final_digest(run_dir) == final_digest(baseline)

    # Flipped bytes keep the size but not the checksum; `checkpoint info` says what it falls back to.
    flipped = tmp_path / "flipped"
    shutil.copytree(baseline, flipped)
    newest = checkpoint.checkpoint_dir(flipped) / f"step-{LAST_STEP:08d}.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    info = checkpoint_info(capsys, flipped)
    assert "checksum mismatch" in info and "step-00000032.pt" in info
    assert "step         32" in info
    # With every checkpoint damaged, resuming is a clear error rather than a silent fresh start.
    for path in checkpoint.list_checkpoints(flipped):
        os.truncate(path, 10)
    with pytest.raises(Exception, match="no valid checkpoint in .*step-00000028.pt is not valid"):
        checkpoint.resolve("auto", flipped)


def test_checkpoint_info_digest_matches_training(baseline, capsys):
    info = checkpoint_info(capsys, baseline)
    for line in ("step         34", "world size   4", "config       digits-mlp", "integrity    ok"):
        assert line in info, info
    assert f"params       sha256:{final_digest(baseline)}" in info


def test_elastic_resume_4_to_2_to_1(datasets, baseline, killed):
    _, snapshot, *_ = killed
    run_dir = snapshot.parent / "elastic"
    shutil.copytree(snapshot, run_dir)
    # Saved at 4 ranks (step 8); 2 ranks continue to step 20, then 1 rank to the end.
    result = hpcdl_train(
        2, "digits-mlp", *settings(datasets, run_dir), "train.max_steps=20", extra=("--resume", "auto")
    )
    assert result.returncode == 0, result.stderr
    assert "resumed at step 8" in result.stdout
    state = checkpoint.load(checkpoint.resolve("latest", run_dir))
    assert (state["global_step"], state["world_size"]) == (20, 2)
    result = hpcdl_train(1, "digits-mlp", *settings(datasets, run_dir), extra=("--resume", "auto"))
    assert result.returncode == 0, result.stderr
    assert "resumed at step 20" in result.stdout
    final = checkpoint.load(checkpoint.resolve("latest", run_dir))
    expected = checkpoint.load(checkpoint.resolve("latest", baseline))
    assert final["global_step"] == expected["global_step"] == LAST_STEP
    # Same sample order at every scale: only the summation order of gradients differs.
    assert_close_states(final["model"], expected["model"])


def test_nan_skip_skips_on_all_ranks(datasets, tmp_path):
    result = hpcdl_train(
        RANKS,
        "digits-mlp",
        *settings(datasets, tmp_path),
        "run.nan_policy='skip'",
        "run.check_every=2",
        "train.max_steps=8",
        extra=("--fault", "nan@1:5"),
    )
    assert result.returncode == 0, result.stderr
    assert "step 5 skipped on all ranks: non-finite loss at step 5 on rank 1" in result.stdout
    summary = read_summary(tmp_path)
    assert summary["skipped_steps"] == 1 and summary["step"] == 8
    assert len(set(summary["param_digests"])) == 1, "a skipped step must leave every replica equal"
    # Adam took 7 steps, not 8: its step count says the skipped step changed nothing.
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path))
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {7}
