"""Scaling studies: run a job at several sizes, report speedup and time splits, project to more nodes.

    hpcdl scale run --config C [--set k=v ...] --ranks 1,2,4 --mode strong|weak --out DIR
    hpcdl scale collect RUN_DIR --out DIR        # one already-launched run (e.g. a Slurm array element)
    hpcdl scale report DIR [DIR ...]             # tables (Markdown, CSV) and PNG plots
    hpcdl scale project --study DIR [--comm comm.json | --alpha S --beta S_PER_BYTE]

Results folder (the one format `scale run`, `scale collect` and the Slurm scaling array write,
and the only thing `scale report` and `scale project` read):

    DIR/study.json               what was studied, written once (if absent) by run or collect:
        {"format": "hpcdl-scale/1", "label": "synthetic-mlp", "config": C, "sets": [...],
         "mode": "strong" | "weak", "ranks": [1, 2, ...], "steps": timed steps per run,
         "warmup": warm-up steps per run, "repeats": R, "threads": threads per rank,
         "launcher": "mpiexec" | "srun" | "external", "provenance": {commit, torch, mpi, cores, ...}}
    DIR/run-r{RANKS}-rep{K}.json one per run (K counts from 0; `collect` takes the next free K):
        {"format": "hpcdl-scale-run/1", "label", "mode", "ranks", "nodes", "threads_per_rank",
         "cores_per_node", "oversubscribed", "repeat", "global_batch", "params", "steps",
         "warmup_steps", "samples_per_s", "step_ms" (wall time per timed step, slowest rank),
         "split_ms": {"data", "compute", "comm", "optimizer", "other"} (per step; compute =
         forward + backward, comm = exposed communication, other = the rest of step_ms),
         "ms_per_step": the train summary's per-phase figures, "comm_bytes_per_step",
         "peak_rss_mb": [per rank], "run_dir"}
    DIR/runs/r{RANKS}-rep{K}/    the train runs themselves (summary.json, metrics.jsonl), from `scale run`
    DIR/scaling.md, scaling.csv, speedup.png, efficiency.png, breakdown.png   from `scale report`

Every field of a run file comes from the `summary.json` that `hpcdl train` writes, so a job
launched any way (srun, mpirun, a Slurm array element) joins a study with `scale collect`.
"""

from __future__ import annotations

import argparse

FORMAT = "hpcdl-scale/1"
RUN_FORMAT = "hpcdl-scale-run/1"


def _run(args: argparse.Namespace) -> int:
    from hpcdl.scale.run import run_study

    run_study(args)
    return 0


def _collect(args: argparse.Namespace) -> int:
    from hpcdl.scale.run import collect

    path = collect(args.run_dir, args.out, mode=args.mode, label=args.label, repeat=args.repeat)
    print(f"scale collect: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from hpcdl.scale.report import report

    report(args.dirs, args.out)
    return 0


def _project(args: argparse.Namespace) -> int:
    from hpcdl.scale.project import run_projection

    run_projection(args)
    return 0


def register(commands) -> None:
    """Add `hpcdl scale {run,collect,report,project}` to the command line."""
    from hpcdl.scale import project

    scale = commands.add_parser("scale", help="scaling studies: runs at several sizes, reports, projections")
    actions = scale.add_subparsers(dest="action", required=True)

    run = actions.add_parser("run", help="run the job at each rank count and write a results folder")
    run.add_argument("--config", required=True, help="a named config (e.g. synthetic-mlp) or a TOML file")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    run.add_argument("--ranks", default="1,2", help="comma-separated rank counts, e.g. 1,2,4")
    run.add_argument(
        "--mode",
        choices=["strong", "weak"],
        default="strong",
        help="strong: same global batch at every size; weak: the same batch per rank as the smallest run",
    )
    run.add_argument("--out", required=True, help="results folder (created; runs are added to it)")
    run.add_argument("--steps", type=int, default=20, help="timed steps per run")
    run.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    run.add_argument("--repeats", type=int, default=3, help="runs per size (interleaved across sizes)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    run.add_argument(
        "--launcher", choices=["mpiexec", "srun"], default="mpiexec", help="srun inside a Slurm allocation"
    )
    run.add_argument(
        "--per-node", type=int, help="ranks per node (e.g. 1: one rank per node of the allocation); default: packed"
    )
    run.add_argument("--timeout", type=float, default=600, help="seconds one run may take before it is stopped")
    run.add_argument("--label", help="the study's name in tables and plots (default: the config's name)")
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")
    run.set_defaults(func=_run)

    collect = actions.add_parser("collect", help="add one finished train run (its summary.json) to a results folder")
    collect.add_argument("run_dir", help="the run's folder (run.dir), holding summary.json")
    collect.add_argument("--out", required=True, help="results folder")
    collect.add_argument("--mode", choices=["strong", "weak"], default="strong")
    collect.add_argument("--label", help="the study's name (default: from the run's config)")
    collect.add_argument("--repeat", type=int, help="repeat index K (default: the next free one for these ranks)")
    collect.set_defaults(func=_collect)

    rep = actions.add_parser("report", help="tables and plots from results folders")
    rep.add_argument("dirs", nargs="+", help="results folders (one series each)")
    rep.add_argument("--out", help="where tables and plots go (default: the first folder)")
    rep.set_defaults(func=_report)

    proj = actions.add_parser("project", help="alpha-beta projection of scaling to 1-1,024 nodes")
    project.add_arguments(proj)
    proj.set_defaults(func=_project)
