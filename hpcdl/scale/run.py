"""`hpcdl scale run` and `scale collect`: the train command at each size, one JSON per run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpcdl.errors import ConfigError, DataError, HpcdlError
from hpcdl.scale import FORMAT, RUN_FORMAT


def parse_ranks(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; sorted, unique, positive."""
    try:
        ranks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--ranks {text!r}: expected comma-separated positive integers, e.g. 1,2,4") from None
    if not ranks or ranks[0] < 1:
        raise ConfigError(f"--ranks {text!r}: expected comma-separated positive integers, e.g. 1,2,4")
    return ranks


def batch_for(base_batch: int, ranks: int, smallest: int, mode: str) -> int:
    """Global batch at `ranks`: fixed (strong), or the smallest run's per-rank batch times `ranks` (weak)."""
    if mode == "strong":
        return base_batch
    if base_batch % smallest:
        raise ConfigError(
            f"--mode weak: train.batch_size = {base_batch} must be divisible by the smallest rank count {smallest}"
        )
    return base_batch // smallest * ranks


def run_record(summary: dict[str, Any], *, mode: str, label: str, repeat: int, run_dir: str) -> dict[str, Any]:
    """One results-folder entry from a train run's summary.json (format in hpcdl/scale/__init__.py)."""
    try:
        phases = summary["ms_per_step"]
        step_ms = summary["step_ms"]
        split = {
            "data": phases.get("data", 0.0),
            "compute": phases.get("forward", 0.0) + phases.get("backward", 0.0),
            "comm": phases.get("comm", 0.0),
            "optimizer": phases.get("optimizer", 0.0),
        }
        split["other"] = max(0.0, step_ms - sum(split.values()))
        return {
            "format": RUN_FORMAT,
            "label": label,
            "mode": mode,
            "ranks": summary["ranks"],
            "nodes": summary["nodes"],
            "threads_per_rank": summary["threads_per_rank"],
            "cores_per_node": summary["cores_per_node"],
            "oversubscribed": summary["oversubscribed"],
            "repeat": repeat,
            "global_batch": summary["global_batch"],
            "params": summary["params"],
            "steps": summary["steps"],
            "warmup_steps": summary.get("timing_skip_steps", summary.get("warmup_steps")),
            "samples_per_s": summary["samples_per_s"],
            "step_ms": step_ms,
            "split_ms": split,
            "ms_per_step": phases,
            "comm_bytes_per_step": summary["comm_bytes_per_step"],
            "peak_rss_mb": summary["peak_rss_mb"],
            "run_dir": run_dir,
        }
    except KeyError as exc:
        raise DataError(f"{run_dir}/summary.json has no {exc} (written by an older hpcdl train?)") from None


def write_study(out: Path, meta: dict[str, Any]) -> None:
    """Write study.json unless the folder already has one (array elements share one folder)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / "study.json", "x") as f:
            json.dump({"format": FORMAT, **meta}, f, indent=2)
            f.write("\n")
    except FileExistsError:
        pass


def write_run(out: Path, record: dict[str, Any], repeat: int | None) -> Path:
    """Write run-r{ranks}-rep{K}.json, taking the next free K when `repeat` is None (safe under concurrency)."""
    k = 0 if repeat is None else repeat
    while True:
        path = out / f"run-r{record['ranks']}-rep{k}.json"
        try:
            # "x": two array elements finishing together never overwrite each other.
            with open(path, "x" if repeat is None else "w") as f:
                json.dump({**record, "repeat": k}, f, indent=2)
                f.write("\n")
            return path
        except FileExistsError:
            k += 1


def collect(run_dir: str, out: str, mode: str = "strong", label: str | None = None, repeat: int | None = None) -> Path:
    """Add one finished train run (its summary.json) to results folder `out`; returns the file written."""
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.is_file():
        raise DataError(f"{summary_path}: not found (did the train run finish? is run.dir right?)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{summary_path}: not valid JSON: {exc}") from None
    study = Path(out) / "study.json"
    if label is None and study.is_file():  # join the study's series
        label = json.loads(study.read_text()).get("label")
    label = label or Path(run_dir).resolve().name
    record = run_record(summary, mode=mode, label=label, repeat=repeat or 0, run_dir=str(run_dir))
    meta = {"label": label, "mode": mode, "launcher": "external", "threads": record["threads_per_rank"]}
    write_study(Path(out), meta)
    return write_run(Path(out), record, repeat)


def _check_inputs(opts: argparse.Namespace, ranks: list[int]) -> int:
    """Load the config and dataset once and check every size; returns the base global batch."""
    from hpcdl import config
    from hpcdl.data.schema import validate
    from hpcdl.parallel.layout import Layout

    cfg = config.load(opts.config, opts.set)
    if opts.steps < 1 or opts.warmup < 0 or opts.repeats < 1 or opts.threads < 1 or (opts.per_node or 1) < 1:
        raise ConfigError("scale run: --steps, --repeats, --threads and --per-node must be >= 1, --warmup >= 0")
    info = validate(cfg.data.path)
    base = cfg.train.batch_size
    for r in ranks:
        cfg.train.batch_size = batch_for(base, r, ranks[0], opts.mode)
        Layout.from_config(cfg, r).check_data(info)  # the same checks (and messages) as the train command
    return base


def _launch(opts: argparse.Namespace, ranks: int, batch: int, run_dir: Path) -> None:
    """One `hpcdl train` job at `ranks` ranks, through mpiexec or srun, with a timeout."""
    from hpcdl.studies import launcher

    total = opts.warmup + opts.steps
    train = [sys.executable, "-m", "hpcdl", "train", "--config", opts.config, "--threads", str(opts.threads)]
    for assignment in [
        *opts.set,
        f"train.batch_size={batch}",
        f"train.max_steps={total}",
        f"train.epochs={total}",  # each epoch has at least one step: max_steps ends the run
        f"run.timing_skip_steps={opts.warmup}",
        f"run.dir='{run_dir}'",
        "run.progress=false",
        "run.checkpoint_every=0",
        "run.keep=1",
    ]:
        train += ["--set", assignment]
    command = launcher(opts.launcher, ranks, opts.per_node)
    if opts.launcher == "srun":
        command.append(f"--cpus-per-task={opts.threads}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(opts.threads)}
    try:
        done = subprocess.run([*command, *train], capture_output=True, text=True, timeout=opts.timeout, env=env)
    except subprocess.TimeoutExpired:
        raise HpcdlError(f"scale run: {ranks}-rank run timed out after {opts.timeout:.0f} s ({run_dir})") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        tail = next((line for line in lines if line.startswith("hpcdl: error")), lines[-1])
        raise HpcdlError(f"scale run: {ranks}-rank run failed (exit {done.returncode}): {tail}")


def run_study(opts: argparse.Namespace) -> Path:
    """Every size x repeat, interleaved (1 2 4 1 2 4 ...), each as its own job; then the report."""
    from hpcdl.studies import provenance

    ranks = parse_ranks(opts.ranks)
    base_batch = _check_inputs(opts, ranks)  # every bad input fails here, before any launch
    out = Path(opts.out)
    label = opts.label or Path(opts.config).stem
    meta = {
        "label": label,
        "config": opts.config,
        "sets": opts.set,
        "mode": opts.mode,
        "ranks": ranks,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "threads": opts.threads,
        "launcher": opts.launcher,
        "per_node": opts.per_node,
        "provenance": provenance(max(ranks), opts.threads),
    }
    write_study(out, meta)
    print(
        f"scale run: {label}, {opts.mode} scaling over {ranks} ranks x {opts.threads} thread(s), "
        f"{opts.warmup} warm-up + {opts.steps} timed steps, {opts.repeats} repeat(s) -> {out}"
    )
    for repeat in range(opts.repeats):
        for r in ranks:
            batch = batch_for(base_batch, r, ranks[0], opts.mode)
            run_dir = out / "runs" / f"r{r}-rep{repeat}"
            began = time.perf_counter()
            _launch(opts, r, batch, run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            record = run_record(summary, mode=opts.mode, label=label, repeat=repeat, run_dir=str(run_dir))
            write_run(out, record, repeat)
            flag = "  OVERSUBSCRIBED" if record["oversubscribed"] else ""
            print(
                f"  {r:>3} ranks  rep {repeat + 1}/{opts.repeats}  {record['samples_per_s']:>10,.0f} samples/s  "
                f"{record['step_ms']:7.2f} ms/step (comm {record['split_ms']['comm']:.2f})  "
                f"[{time.perf_counter() - began:.0f} s]{flag}",
                flush=True,
            )
    if not opts.no_report:
        from hpcdl.scale.report import report

        report([str(out)], None)
    return out
