"""Nothing partial, no late or raw failure: outputs checked before the work, an existing file replaced only with
--overwrite, a reader that leaves a pipe, a TensorBoard folder lost mid-run, a resumed run's stale summary.
One rank, in process (`comm.init` makes a singleton), where one process proves the point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl import cli
from hpcdl.metrics import TensorBoardLog

from conftest import REPO


def train(data: Path, run_dir: Path, *args: str) -> int:
    """`hpcdl train` in this process; an agreed failure's exit status as the return value."""
    sets = [
        f"data.path='{data}'",
        f"run.dir='{run_dir}'",
        "model.hidden=[8]",
        "train.batch_size=60",
        "run.progress=false",
    ]
    try:
        return cli.main(["train", "--config", "digits-mlp", "--threads", "1", *[a for s in sets for a in ("--set", s)],
                         *args])  # fmt: skip
    except SystemExit as ended:
        return ended.code


def test_a_reader_that_leaves_the_pipe_is_no_error(datasets):
    shell = f"{sys.executable} -m hpcdl data info {datasets['digits']} | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout == f"{datasets['digits']}\n" and done.stderr == "", done.stderr
    assert done.returncode in (0, 141)  # 141 = 128 + SIGPIPE when head left before the last line was written


def test_data_make_and_bench_refuse_an_existing_output_before_the_work(tmp_path, capsys):
    out = tmp_path / "digits.h5"
    out.write_text("mine\n")
    assert cli.main(["data", "make", "digits", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert cli.main(["bench", "allreduce", "--json", str(out)]) == 2  # refused at once, before any launch
    assert "--json" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert cli.main(["data", "make", "digits", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_tensorboard_folder_lost_mid_run_is_one_warning_and_the_run_goes_on(tmp_path, capsys):
    folder = tmp_path / "tensorboard"
    events = TensorBoardLog(folder)
    events.write("epoch", {"loss": 1.0}, 1)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    folder.write_text("a file now\n")
    events.write("epoch", {"loss": 0.5}, 2)
    events.write("epoch", {"loss": 0.25}, 3)  # said once: the writer is off
    events.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hpcdl: warning: TensorBoard events in {folder} stopped"), lines


def test_a_resumed_run_that_fails_leaves_no_stale_summary_and_a_fresh_one_no_folder(datasets, tmp_path):
    run_dir = tmp_path / "run"
    assert train(datasets["digits"], run_dir, "--set", "train.epochs=1") == 0
    assert json.loads((run_dir / "summary.json").read_text())["epoch"] == 1.0
    steps = json.loads((run_dir / "summary.json").read_text())["steps"]
    failed = train(datasets["digits"], run_dir, "--set", "train.epochs=2", "--resume", "auto",
                   "--fault", f"nan@0:{steps + 2}")  # fmt: skip
    assert failed == 2 and not (run_dir / "summary.json").exists(), "a summary of the earlier leg stayed"
    assert (run_dir / "checkpoints").is_dir(), "the resumable run stays"
    fresh = tmp_path / "fresh"
    assert train(datasets["digits"], fresh, "--fault", "nan@0:1") == 2
    assert not fresh.exists(), "a fresh run that failed at step 1 left its folder"
    assert train(datasets["digits"], fresh, "--set", "train.epochs=1") == 0, "the corrected rerun is refused"


@pytest.mark.parametrize("when", ["fresh", "overwrite"])
def test_a_refused_start_after_the_claim_restores_what_overwrite_moved(datasets, tmp_path, when):
    run_dir = tmp_path / "run"
    if when == "overwrite":
        assert train(datasets["digits"], run_dir, "--set", "train.epochs=1") == 0
    before = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None
    ramp = ("--set", "prune.final_sparsity=0.5", "--set", "prune.start=900", "--set", "prune.end=990")
    assert train(datasets["digits"], run_dir, *ramp, "--overwrite") == 2
    assert (sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None) == before
    assert not list(tmp_path.glob("run.old-*")), "the old run was left aside"
