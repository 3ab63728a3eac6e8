"""`hpcdl sweep` refuses before its first trial what no trial could do, writes nothing when it refuses, exits non-zero
when no trial succeeded, and stops between trials on a signal. One rank, in process: `comm.init` makes a singleton."""

from __future__ import annotations

import io
import json
import os
import signal
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from hpcdl import cli
from hpcdl.comm import EXIT_REQUEUE
from hpcdl.data import make
from hpcdl.resilience import STOP_SIGNALS

BASE = ("model.hidden=[16]", "train.batch_size=32", "train.epochs=1")


def sweep(config: str, data: Path, out: Path, *args: str) -> int:
    """`hpcdl sweep` in this process: one rank, one group."""
    sets = [a for s in (f"data.path='{data}'", *BASE) for a in ("--set", s)]
    return cli.main(["sweep", "--config", config, "--threads", "1", *sets, "--out", str(out), *args])


def refusal(capsys, config: str, data: Path, out: Path, *args: str) -> str:
    """The one line a refused sweep prints (status 2)."""
    with pytest.raises(SystemExit) as ended:
        sweep(config, data, out, *args)
    lines = capsys.readouterr().err.splitlines()
    assert ended.value.code == 2 and len(lines) == 1 and lines[0].startswith("hpcdl: error: "), lines
    return lines[0].removeprefix("hpcdl: error: ")


REFUSED = [
    (("--grid", "train.lr=0.02", "--metric", "val_f1"),
     "--metric val_f1: not a metric of this run; its epoch records hold loss, acc, val_loss, val_acc"),
    (("--grid", "train.nope=1,2"), "trial 0 (train.nope=1): config: unknown key 'train.nope'"),
    (("--grid", "train.epochs=1,3"), "--grid train.epochs: the sweep sets it in every trial itself"),
    (("--grid", "train.lr=0.02,-1"), "trial 1 (train.lr=-1): config: train.lr must be a finite number > 0, got -1.0"),
    (("--random", "2", "--grid", "train.lr=uniform:-2:-1"), "trial 0 (train.lr=-1."),
    (("--grid", "train.lr=0.02", "--groups", "2"), "--groups 2: the job's 1 ranks do not split into 2 equal groups"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "words"), REFUSED, ids=["metric", "key", "epochs", "value", "random-value", "groups"])
def test_what_no_trial_could_do_is_refused_before_any_trial_and_writes_nothing(datasets, tmp_path, capsys, args, words):
    out = tmp_path / "out"
    assert words in refusal(capsys, "digits-mlp", datasets["synthetic"], out, *args)
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_and_left_as_it_was(datasets, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    for out in (taken, taken / "sweep"):
        line = refusal(capsys, "digits-mlp", datasets["synthetic"], out, "--grid", "train.lr=0.02")
        assert line == f"--out {out}{'' if out == taken else f' lies inside {taken}, which'} is a file; name a folder"
    assert taken.read_text() == "mine\n"


def test_a_regression_sweep_ranks_by_what_its_records_hold_after_a_refusal_left_its_out_free(tmp_path, capsys):
    data, out = tmp_path / "diabetes.h5", tmp_path / "out"
    make.make_diabetes(data)
    refusal(capsys, "diabetes-mlp", data, out, "--grid", "train.lr=1e-3", "--groups", "3")
    line = refusal(capsys, "diabetes-mlp", data, out, "--grid", "train.lr=1e-3", "--metric", "val_acc")
    assert line.endswith("its epoch records hold loss, rmse, mae, r2, val_loss, val_rmse, val_mae, val_r2")
    assert sweep("diabetes-mlp", data, out, "--grid", "train.lr=1e-3") == 0  # not "holds a sweep"
    assert "ranked by val_loss (min)" in capsys.readouterr().out
    (trial,) = json.loads((out / "results.json").read_text())["trials"]
    assert trial["status"] == "ok" and trial["metric"] > 0


def test_a_sweep_whose_every_trial_failed_exits_2_with_its_results_written(datasets, tmp_path, capsys):
    out = tmp_path / "out"
    faults = ("--fault", "0=nan@0:1", "--fault", "1=raise@0:2")
    with pytest.raises(SystemExit) as ended:
        sweep("digits-mlp", datasets["synthetic"], out, "--grid", "train.lr=0.02,0.05", *faults)
    assert ended.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hpcdl: error")]
    assert errors == [f"hpcdl: error: hpcdl sweep: no trial succeeded (2 failed); see {out / 'results.md'}"]
    trials = json.loads((out / "results.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["failed", "failed"]


class SignalAtRow(io.StringIO):
    """Standard output that sends this process SIGTERM as trial 0's row is printed: between trials 0 and 1."""

    def write(self, text: str) -> int:
        if text.startswith("trial   0"):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().write(text)


@pytest.fixture
def stop_signals_kept():
    """SIGTERM ignored unless the sweep catches it (a sweep that does not fails the test, not pytest); then the
    process's stop handlers and wakeup fd as they were (a stopped sweep keeps its own, as training does)."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    wakeup = signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, lambda *_: None)
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    signal.set_wakeup_fd(wakeup)


def test_a_signal_between_trials_stops_the_sweep_before_the_next_and_resume_finishes_it(
    datasets, tmp_path, stop_signals_kept
):
    out, grid = tmp_path / "out", ("--grid", "train.lr=0.02,0.05")
    printed = SignalAtRow()
    with redirect_stdout(printed):
        status = sweep("digits-mlp", datasets["synthetic"], out, *grid)
    assert status == EXIT_REQUEUE, printed.getvalue()
    assert "hpcdl sweep: stopped by a signal; continue with the same command and --resume auto" in printed.getvalue()
    assert (out / "trials" / "000" / "result.json").is_file() and not (out / "trials" / "001").exists()
    with redirect_stdout(io.StringIO()):
        assert sweep("digits-mlp", datasets["synthetic"], out, *grid, "--resume", "auto") == 0
    trials = json.loads((out / "results.json").read_text())["trials"]
    assert sorted((t["trial"], t["status"]) for t in trials) == [(0, "ok"), (1, "ok")]
