"""Running a sweep: the world cut into equal groups (`Comm.Split`), each training whole trials on its own
contained sub-communicator with the one training engine; trials handed out as groups free up.

A group's leader claims the next trial with an atomic fetch-and-add on a counter in world rank 0's memory
(no rank serves the queue) and tells its group. Before each claim the group agrees whether a stop signal came
(SIGTERM/SIGUSR1/SIGINT: the sweep catches them between trials, a trial's training while it runs); a group
that stops raises a second counter, so every group stops at its next claim instead of starting a trial.

A failure a group's ranks agree on (a set-up check, a NaN, a step that raised on one rank: see
`World.contained`) ends that trial only; it is recorded and the group takes the next one. (Every trial's
config is loaded before the first starts: a bad key or value refuses the sweep.) A dead rank still ends the
job (the MPI contract); `--resume auto` skips finished trials and continues unfinished ones from their
checkpoints.

Successive halving (`halving = R`): every trial trains `min_epochs`, the best 1/R go on for R times as
many epochs (resumed from their checkpoints), and so on up to the config's `train.epochs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl import config
from hpcdl.comm import SharedCounters, World
from hpcdl.data.schema import validate
from hpcdl.errors import ConfigError, HpcdlError, TrialFailed
from hpcdl.faults import Injector
from hpcdl.parallel.loss import make_objective
from hpcdl.resilience import StopSignals

# Keys the sweep sets in every trial itself (its folder, no progress bar, the round's epochs): not for --grid.
SWEEP_SETS = ("run.dir", "run.progress", "train.epochs")
NEXT_TRIAL = 0  # the counter slot groups claim trials from
STOP = 1  # the counter slot a stopping group raises: every group stops at its next claim
RESULT = "result.json"


@dataclass
class Plan:
    """What to sweep: the base config and its overrides, the trials, and how to rank and cut them."""

    base: str
    sets: list[str]
    trials: list[dict[str, str]]
    groups: int
    out: Path
    metric: str = "val_acc"
    mode: str = "max"
    halving: int = 0
    min_epochs: int = 1
    faults: dict[int, list[str]] = field(default_factory=dict)  # trial index -> --fault specs, for tests


def trial_dir(out: Path, index: int) -> Path:
    """Where trial `index` keeps its run (checkpoints, metrics) and its result."""
    return out / "trials" / f"{index:03d}"


def read_result(out: Path, index: int) -> dict[str, Any] | None:
    """Trial `index`'s recorded result, if it has one."""
    path = trial_dir(out, index) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def budgets(plan: Plan, epochs: int) -> list[int]:
    """Epochs of each round: [epochs] without halving; min_epochs x R^k up to `epochs` with it."""
    if not plan.halving:
        return [epochs]
    rounds, budget = [], plan.min_epochs
    while budget < epochs:
        rounds.append(budget)
        budget *= plan.halving
    return [*rounds, epochs]


def check_groups(ranks: int, groups: int) -> None:
    """--groups must cut the job's ranks into equal groups."""
    if groups < 1 or ranks % groups:
        raise ConfigError(
            f"--groups {groups}: the job's {ranks} ranks do not split into {groups} equal groups; "
            f"use a divisor of {ranks}"
        )


def split_groups(world: World, groups: int) -> World:
    """This rank's group (see `check_groups`): world ranks cut into `groups` equal consecutive blocks, as a
    contained world."""
    per_group = world.size // groups
    return dataclasses.replace(world.split(world.rank // per_group), contained=True)


def trial_settings(sets: list[str], overrides: dict[str, str]) -> list[str]:
    """A trial's --set list: the base overrides, then the trial's values."""
    return [*sets, *(f"{k}={v}" for k, v in overrides.items())]


def trial_configs(base: str, sets: list[str], trials: list[dict[str, str]]) -> list[config.Config]:
    """Each trial's config, loaded as its run loads it: a bad key or value is one line naming the trial, before
    any trial starts."""
    configs = []
    reserved = sorted({key for overrides in trials for key in overrides} & set(SWEEP_SETS))
    if reserved:
        raise ConfigError(
            f"--grid {reserved[0]}: the sweep sets it in every trial itself (epochs: the config's train.epochs, "
            "or the rounds of --halving; each trial's own folder, no progress bar); set train.epochs with --set"
        )
    for index, overrides in enumerate(trials):
        try:
            configs.append(config.load(base, trial_settings(sets, overrides)))
        except ConfigError as exc:
            shown = " ".join(f"{k}={v}" for k, v in overrides.items())
            raise ConfigError(f"trial {index} ({shown}): {exc}") from None
    return configs


def produced_metrics(configs: list[config.Config]) -> list[str]:
    """The metrics every trial's epoch records hold: its data file's task decides (only the header is read)."""
    produced: list[str] | None = None
    for path in dict.fromkeys(cfg.data.path for cfg in configs):
        names = make_objective(validate(path, splits=()).task).metric_names()
        produced = names if produced is None else [name for name in produced if name in names]
    return produced or []


class SweepSignals(StopSignals):
    """The sweep's stop signals, caught between trials (a trial's training installs its own while it runs)."""

    def pending(self) -> bool:
        """Whether a stop signal came: to the sweep, or to a trial after its last step's verdict (that trial's
        handlers then stay in place of ours: see StopSignals.uninstall)."""
        displaced = bool(self.previous) and signal.getsignal(signal.SIGTERM) != self._on_signal
        return bool(self.received) or displaced


def run_sweep(world: World, plan: Plan, epochs: int, on_result=None) -> tuple[list[dict[str, Any] | None], bool]:
    """Train every trial of `plan` (rounds of successive halving if asked). Returns every trial's result (None
    for one not trained) on every rank, and whether a stop signal ended the sweep early."""
    group = split_groups(world, plan.groups)
    signals = SweepSignals()
    signals.install()
    try:
        stopped = run_rounds(world, group, plan, epochs, signals, on_result)
    finally:
        signals.uninstall()  # after a stop its handlers stay: a second signal ends the rank at once
    everything = [read_result(plan.out, i) for i in range(len(plan.trials))] if world.is_root else None
    return world.bcast(everything, root=0), stopped


def run_rounds(world: World, group: World, plan: Plan, epochs: int, signals: SweepSignals, on_result) -> bool:
    """The rounds of the sweep (one without halving); whether a stop signal ended them early."""
    todo = list(range(len(plan.trials)))
    for budget in budgets(plan, epochs):
        counters = SharedCounters(world, slots=2)
        stopped = run_round(group, plan, todo, budget, counters, signals, on_result)
        counters.close()  # collective over the world: every group is done with this round
        if world.allreduce_max(np.array([float(stopped)]))[0]:
            return True
        results = world.bcast([read_result(plan.out, i) for i in todo] if world.is_root else None, root=0)
        if budget != epochs:
            todo = survivors(plan, todo, results)
    return False


def run_round(
    group: World, plan: Plan, todo: list[int], budget: int, counters: SharedCounters, signals: SweepSignals, on_result
) -> bool:
    """This group's trials of one round, claimed one at a time until none is left; whether the sweep stops."""
    stopping = False
    while True:
        # Agreed by the group before its leader claims: no rank leaves while another starts a trial.
        stopping = stopping or bool(group.allreduce_max(np.array([float(signals.pending())]))[0])
        claim = group.bcast(claim_next(counters, stopping) if group.is_root else None, root=0)
        if claim is None:
            return True
        if claim >= len(todo):
            return False
        result = run_trial(group, plan, todo[claim], budget)
        stopping = result["status"] == "stopped"  # the signal reached every rank of the group
        if on_result is not None and group.is_root:
            on_result(result)


def claim_next(counters: SharedCounters, stopping: bool) -> int | None:
    """The group leader's claim: the next trial's place in the round, or None when the sweep stops (this group
    was signalled, or another group raised STOP)."""
    if stopping:
        counters.add(STOP, 1)
        return None
    if counters.add(STOP, 0):
        return None
    return counters.add(NEXT_TRIAL, 1)


def survivors(plan: Plan, todo: list[int], results: list[dict[str, Any] | None]) -> list[int]:
    """The best 1/R of this round's finished trials (at least one), by the plan's metric."""
    sign = -1 if plan.mode == "max" else 1  # ties: the lower trial number first
    scored = [
        (sign * r["metric"], i) for i, r in zip(todo, results) if r and r["status"] == "ok" and r["metric"] is not None
    ]
    scored.sort()
    keep = max(1, math.ceil(len(todo) / plan.halving))
    return sorted(i for _, i in scored[:keep])


def run_trial(group: World, plan: Plan, index: int, epochs: int) -> dict[str, Any]:
    """Train trial `index` for `epochs` on `group` (or take its recorded result); its result, on every rank."""
    recorded = read_result(plan.out, index) if group.is_root else None
    recorded = group.bcast(recorded, root=0)
    done = recorded and recorded["status"] == "ok" and recorded["epochs_asked"] >= epochs
    if done or (recorded and recorded["status"] == "failed"):
        return recorded  # finished before (a resumed sweep), or failed: not tried again
    folder = trial_dir(plan.out, index)
    overrides = plan.trials[index]
    run_dir, progress, trial_epochs = SWEEP_SETS
    sets = [*trial_settings(plan.sets, overrides), f"{run_dir}='{folder}'", f"{progress}=false"]
    sets.append(f"{trial_epochs}={epochs}")
    began, status, error, stopped = time.perf_counter(), "ok", None, False
    try:
        cfg = config.load(plan.base, sets)  # the same on every rank: a bad value fails everywhere alike
        faults = Injector(plan.faults.get(index, []), group.rank, group.size)
        summary = train_quietly(cfg, group, folder, faults)
        stopped = bool(summary.get("stopped_by"))
    except (TrialFailed, ConfigError) as exc:
        status, error = "failed", str(exc)
    result = {
        "trial": index,
        "overrides": overrides,
        "status": "stopped" if stopped else status,
        "error": error,
        "epochs_asked": epochs,
        "seconds": time.perf_counter() - began + (recorded or {}).get("seconds", 0.0),
    }
    if group.is_root:  # the group leader reads the trial's records and writes its result
        result.update(epoch_figures(folder / "metrics.jsonl", plan.metric, plan.mode))
        write_result(folder, result)
    return group.bcast(result, root=0)


def train_quietly(cfg: config.Config, group: World, folder: Path, faults: Injector | None = None) -> dict[str, Any]:
    """`train` on the group, its log in the trial's train.log (the sweep's output is the table of trials)."""
    from hpcdl.train import train

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.log", "a") as log, contextlib.redirect_stdout(log):
        return train(cfg, group, resume="auto", faults=faults, overwrite=True)


def epoch_figures(metrics: Path, metric: str, mode: str) -> dict[str, Any]:
    """From a trial's metrics.jsonl: epochs done, the final and best value of `metric`."""
    values = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "epoch" and metric in record:
                values.append((record["epoch"], record[metric]))
    if not values:
        return {"epochs": 0, "metric": None, "best": None}
    pick = max if mode == "max" else min
    return {"epochs": values[-1][0], "metric": values[-1][1], "best": pick(v for _, v in values)}


def write_result(folder: Path, result: dict[str, Any]) -> None:
    """The trial's result.json, atomically (a resumed sweep trusts what it finds)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{RESULT}.partial"
    partial.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(partial, folder / RESULT)


def check_faults(specs: list[str], trials: int) -> dict[int, list[str]]:
    """--fault TRIAL=KIND@RANK:STEP -> {trial: [KIND@RANK:STEP]}; one line for a malformed one."""
    faults: dict[int, list[str]] = {}
    for spec in specs:
        trial, sep, fault = spec.partition("=")
        if not sep or not trial.isdigit() or int(trial) >= trials:
            raise HpcdlError(f"--fault {spec!r}: expected TRIAL=KIND@RANK:STEP with TRIAL < {trials}")
        faults.setdefault(int(trial), []).append(fault)
    return faults
