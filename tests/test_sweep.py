"""Task-parallel sweeps: trials on groups equal the same trainings alone; failures stay in their trial; a killed
sweep resumes to the same table; random draws repeat with their seed; halving keeps the best trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcdl import checkpoint
from hpcdl.comm import EXIT_REQUEUE
from hpcdl.sweep import space
from hpcdl.sweep.runner import RESULT

from conftest import hpcdl_train, read_summary, run_mpi

BASE = ("model.hidden=[16]", "train.batch_size=32", "train.max_steps=0", "train.epochs=2", "run.checkpoint_every=5")
GRID = ("--grid", "train.lr=0.02,0.08", "--grid", "model.hidden=[8],[16]")


def sweep(ranks: int, data: Path, out: Path, *args: str, timeout: float = 240):
    """`hpcdl sweep` on the synthetic set under mpiexec."""
    sets = [a for s in (f"data.path='{data}'", *BASE) for a in ("--set", s)]
    command = ["-m", "hpcdl", "sweep", "--config", "digits-mlp", "--threads", "1", *sets, "--out", str(out), *args]
    return run_mpi(ranks, *command, timeout=timeout)


def results(out: Path) -> dict[int, dict]:
    """Each trial's entry of results.json, by trial number."""
    return {r["trial"]: r for r in json.loads((out / "results.json").read_text())["trials"]}


@pytest.fixture(scope="module")
def whole(datasets, tmp_path_factory) -> Path:
    """An uninterrupted sweep: 4 ranks, 2 groups, 4 trials."""
    out = tmp_path_factory.mktemp("sweep") / "whole"
    result = sweep(4, datasets["synthetic"], out, "--groups", "2", *GRID)
    assert result.returncode == 0, result.stderr
    return out


def test_each_trial_equals_the_same_training_alone_at_the_groups_size(datasets, whole, tmp_path):
    table = results(whole)
    assert sorted(table) == [0, 1, 2, 3] and all(r["status"] == "ok" for r in table.values())
    for index, trial in enumerate(space.grid(list(GRID[1::2]))):
        alone = tmp_path / f"alone-{index}"
        sets = [f"data.path='{datasets['synthetic']}'", *BASE, *(f"{k}={v}" for k, v in trial.items())]
        result = hpcdl_train(2, "digits-mlp", *sets, f"run.dir='{alone}'", "run.progress=false")
        assert result.returncode == 0, result.stderr
        in_sweep = read_summary(whole / "trials" / f"{index:03d}")
        assert in_sweep["param_digests"] == read_summary(alone)["param_digests"], trial
        assert table[index]["metric"] == read_summary(alone)["val_acc"]
    ranked = json.loads((whole / "results.json").read_text())["trials"]
    assert [r["metric"] for r in ranked] == sorted((r["metric"] for r in ranked), reverse=True)
    assert (whole / "results.md").read_text().count("\n| ") == 4 and (whole / "sweep.png").stat().st_size > 0


def test_failing_trials_are_recorded_and_the_others_finish(datasets, tmp_path):
    # Trial 1: an exception on one rank of its group; trial 2: NaN features.
    args = ("--groups", "2", "--grid", "train.lr=0.02,0.03,0.04", "--fault", "1=raise@1:3", "--fault", "2=nan@0:2")
    result = sweep(4, datasets["synthetic"], tmp_path / "out", *args)
    assert result.returncode == 0, result.stderr
    table = results(tmp_path / "out")
    assert table[0]["status"] == "ok" and table[0]["epochs"] == 2
    assert table[1]["status"] == "failed"
    assert table[1]["error"] == "rank 1: RuntimeError: injected fault: raise on rank 1 at step 3"
    assert table[2]["status"] == "failed" and "non-finite loss at step 2" in table[2]["error"]
    assert "MPI_Abort" not in result.stderr and "Traceback" not in result.stderr


def test_a_signal_to_one_group_stops_every_group_before_its_next_trial(datasets, tmp_path):
    # Trial 0 is stopped at step 2 by a signal to its group's rank; the other group, unsignalled, finishes trial 1
    # and then finds the stop raised instead of starting trial 2. Trial 1 is long (batches of 2 rows against the
    # stop's few steps), so the stop is raised while it trains, whichever group claims which trial.
    out = tmp_path / "out"
    args = ("--groups", "2", "--grid", "train.batch_size=32,2,32", "--fault", "0=signal@0:2")
    result = sweep(2, datasets["synthetic"], out, *args)
    assert result.returncode == EXIT_REQUEUE, result.stderr
    assert "hpcdl sweep: stopped by a signal; continue with the same command and --resume auto" in result.stdout
    statuses = [json.loads((out / "trials" / f"{i:03d}" / RESULT).read_text())["status"] for i in (0, 1)]
    assert statuses == ["stopped", "ok"] and not (out / "trials" / "002").exists()


def final_digest(run_dir: Path) -> str:
    """The parameter digest of a run's newest valid checkpoint."""
    return checkpoint.parameter_digest(checkpoint.load(checkpoint.newest_valid(run_dir))["model"])


def test_a_killed_sweep_resumes_to_the_same_table(datasets, whole, tmp_path):
    out = tmp_path / "out"
    # Trial 3 (the second group's second) dies at step 8: its group's rank 1 is killed, which ends the job.
    killed = sweep(4, datasets["synthetic"], out, "--groups", "2", *GRID, "--fault", "3=kill@1:8")
    assert killed.returncode != 0
    done_before = {i: (out / "trials" / f"{i:03d}" / "result.json").stat().st_mtime_ns
                   for i in range(4) if (out / "trials" / f"{i:03d}" / "result.json").is_file()}  # fmt: skip
    assert done_before and 3 not in done_before
    refused = sweep(4, datasets["synthetic"], out, "--groups", "2", *GRID)
    assert refused.returncode == 2 and "holds a sweep; continue it with --resume auto" in refused.stderr
    resumed = sweep(4, datasets["synthetic"], out, "--groups", "2", *GRID, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    for index, mtime in done_before.items():  # finished trials are not trained again
        assert (out / "trials" / f"{index:03d}" / "result.json").stat().st_mtime_ns == mtime
    assert "resumed at step 5" in (out / "trials" / "003" / "train.log").read_text()
    for index, trial in results(whole).items():
        again = results(out)[index]
        assert (again["status"], again["metric"], again["epochs"]) == (
            trial["status"],
            trial["metric"],
            trial["epochs"],
        )
        # The newest checkpoint's weights: a trial killed after its last checkpoint but before its summary resumes as
        # already complete, with no summary.json to read.
        digests = [final_digest(folder / "trials" / f"{index:03d}") for folder in (whole, out)]
        assert digests[0] == digests[1]


def test_random_search_repeats_with_its_seed():
    specs = ["train.lr=log:1e-4:1e-1", "model.hidden=[8],[16],[32]", "train.momentum=uniform:0.5:0.99"]
    first, again, other = (space.random_trials(specs, 6, seed) for seed in (3, 3, 4))
    assert first == again and first != other
    assert all(1e-4 <= float(t["train.lr"]) <= 1e-1 and t["model.hidden"] in ("[8]", "[16]", "[32]") for t in first)
    assert space.split_values("[16,32],[32,64]") == ["[16,32]", "[32,64]"]


def test_successive_halving_keeps_the_best_half_each_round(datasets, tmp_path):
    out = tmp_path / "out"
    grid = ("--grid", "train.lr=0.002,0.01,0.05,0.2")
    result = sweep(2, datasets["synthetic"], out, "--groups", "2", *grid, "--halving", "2", "--min-epochs", "1")
    assert result.returncode == 0, result.stderr
    table = results(out)
    # Round 1: every trial 1 epoch; round 2: the best 2 of them go on to the config's 2 epochs.
    went_on = sorted(i for i, r in table.items() if r["epochs"] == 2)
    stayed = sorted(i for i, r in table.items() if r["epochs"] == 1)
    assert len(went_on) == 2 and len(stayed) == 2
    first_round = {}
    for index in range(4):
        records = [json.loads(line) for line in (out / "trials" / f"{index:03d}" / "metrics.jsonl").open()]
        epochs = [r for r in records if r.get("event") == "epoch"]
        first_round[index] = epochs[0]["val_acc"]
    best_two = sorted(sorted(first_round, key=lambda i: -first_round[i])[:2])
    assert went_on == best_two, first_round
