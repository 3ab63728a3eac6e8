"""`hpcdl sweep`: many trainings in one MPI job, on groups of ranks."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SWEEP_FILE = "sweep.json"  # the trials and settings, written at the first start, read back on resume


def register(commands) -> None:
    """Add `hpcdl sweep` to the command line."""
    sweep = commands.add_parser("sweep", help="a hyper-parameter search in one MPI job: groups of ranks train trials")
    sweep.add_argument("--config", required=True, help="the base config: a named config or a TOML file")
    sweep.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="a base override")
    sweep.add_argument("--groups", type=int, default=1, help="groups the ranks are cut into (each trains one trial)")
    sweep.add_argument(
        "--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
        help="values to sweep (the cartesian product); with --random, a range: log:1e-4:1e-1, uniform:A:B, int:A:B",
    )  # fmt: skip
    sweep.add_argument("--random", type=int, default=0, metavar="N", help="N random draws instead of the grid")
    sweep.add_argument("--seed", type=int, default=0, help="the random draws' seed")
    sweep.add_argument("--halving", type=int, default=0, metavar="R", help="successive halving: the best 1/R go on")
    sweep.add_argument("--min-epochs", type=int, default=1, help="halving: the first round's epochs")
    sweep.add_argument(
        "--metric", default="", help="the epoch record's metric ranking trials (default val_acc; regression val_loss)"
    )
    sweep.add_argument("--mode", default="", help="max or min (default: max for acc and r2, else min)")
    sweep.add_argument("--out", required=True, help="the sweep's folder: trials/NNN/, results.json/.md, sweep.png")
    sweep.add_argument("--resume", choices=["auto"], help="continue the sweep in --out: finished trials are kept")
    sweep.add_argument(
        "--fault", action="append", default=[], metavar="TRIAL=KIND@RANK:STEP", help="inject a fault, for tests"
    )
    sweep.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks on the node)")
    sweep.set_defaults(func=_sweep)


def _plan(args: argparse.Namespace, ranks: int):
    """The checked plan (every rank builds it; a bad option is one line): every trial's config, the metric,
    the groups and --out are checked before anything is written."""
    from hpcdl import config
    from hpcdl.errors import HpcdlError
    from hpcdl.sweep import space
    from hpcdl.sweep.runner import Plan, check_faults, check_groups, trial_configs

    base = config.load(args.config, args.set)
    if not args.grid:
        raise HpcdlError("hpcdl sweep: nothing to sweep; give --grid SECTION.KEY=V1,V2 (one or more)")
    for flag, value in (("--random", args.random), ("--halving", args.halving)):
        if value < 0 or value == 1:
            raise HpcdlError(f"{flag} {value}: must be 0 (off) or >= 2")
    if args.min_epochs < 1:
        raise HpcdlError(f"--min-epochs {args.min_epochs}: must be >= 1")
    trials = space.random_trials(args.grid, args.random, args.seed) if args.random else space.grid(args.grid)
    metric, mode = _ranking(args.metric, args.mode, trial_configs(args.config, args.set, trials))
    check_groups(ranks, args.groups)
    out = Path(args.out)
    settings = {"config": args.config, "set": args.set, "trials": trials}
    _check_out(out, settings, args.resume)
    plan = Plan(
        args.config, args.set, trials, args.groups, out, metric, mode, args.halving, args.min_epochs,
        check_faults(args.fault, len(trials)),
    )  # fmt: skip
    return plan, base.train.epochs, settings


def _ranking(metric: str, mode: str, configs) -> tuple[str, str]:
    """--metric (default val_acc, val_loss for a regression set), one the trials' epoch records hold, and --mode."""
    from hpcdl.errors import HpcdlError
    from hpcdl.sweep.runner import produced_metrics

    produced = produced_metrics(configs)
    metric = metric or ("val_acc" if "val_acc" in produced else "val_loss")
    if metric not in produced:
        raise HpcdlError(f"--metric {metric}: not a metric of this run; its epoch records hold {', '.join(produced)}")
    mode = mode or ("max" if metric.endswith(("acc", "r2")) else "min")
    if mode not in ("max", "min"):
        raise HpcdlError(f"--mode {mode!r}: max or min")
    return metric, mode


def _check_out(out: Path, settings: dict, resume: str | None) -> None:
    """--out is a folder (or can become one) and holds no other sweep; with --resume, the same sweep."""
    from hpcdl.errors import HpcdlError
    from hpcdl.outputs import nearest_existing

    nearest = nearest_existing(out)  # --out, or the folder it goes in
    if not nearest.is_dir():
        inside = "" if nearest == out else f" lies inside {nearest}, which"
        raise HpcdlError(f"--out {out}{inside} is a file; name a folder")
    saved = out / SWEEP_FILE
    if not saved.is_file():
        return
    if not resume:
        raise HpcdlError(f"{out} holds a sweep; continue it with --resume auto, or choose another --out")
    if json.loads(saved.read_text()) != settings:
        raise HpcdlError(
            f"--resume: the sweep in {out} was started with other --config/--set/--grid/--random/--seed; "
            "resume with the same options, or choose another --out"
        )


def _start(out: Path, settings: dict) -> None:
    """Rank 0: the sweep's folder and its sweep.json (read back by --resume auto)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(json.dumps(settings, indent=1) + "\n")


def _sweep(args: argparse.Namespace) -> int:
    from hpcdl import comm
    from hpcdl.sweep import report
    from hpcdl.sweep.runner import run_sweep

    world = comm.init(threads=args.threads)
    plan, epochs, settings = world.agree(lambda: _plan(args, world.size))
    world.agree(lambda: _start(plan.out, settings) if world.is_root else None)
    world.log(
        f"hpcdl sweep: {len(plan.trials)} trials on {plan.groups} group(s) of {world.size // plan.groups} rank(s)"
        + (f", successive halving by {plan.halving}" if plan.halving else "")
        + f"; ranked by {plan.metric} ({plan.mode}); trials in {plan.out / 'trials'}"
    )
    began = time.perf_counter()
    results, stopped = run_sweep(world, plan, epochs, on_result=lambda r: print(report.row(r, plan.metric), flush=True))
    if stopped:
        world.log("hpcdl sweep: stopped by a signal; continue with the same command and --resume auto")
        return comm.EXIT_REQUEUE
    if world.is_root:
        lines = report.write(plan.out, results, plan.metric, plan.mode, time.perf_counter() - began)
        print(f"hpcdl sweep: ranked by {plan.metric} ({plan.mode}); {plan.out}/results.md, sweep.png", flush=True)
        print("\n".join(lines), flush=True)
    sys.stdout.flush()
    failed = sum(r["status"] == "failed" for r in results if r)
    if not any(r and r["status"] == "ok" for r in results):  # a table of failures is no result: not status 0
        world.fail_all(f"hpcdl sweep: no trial succeeded ({failed} failed); see {plan.out / 'results.md'}")
    return 0
