"""The command line: hpcdl data | train | sweep | checkpoint | plot | infer | evaluate | export | prune | bench | scale
| slurm.

Building the parser imports no torch, h5py or mpi4py (every command module defers them to the
command itself), so `--help` and bad usage answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hpcdl import __version__
from hpcdl.errors import HpcdlError


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with the option's default, except where that says nothing or is said already.

    Left out: no default (None or an empty list), flags (off unless given), and help that names its default itself.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, []) or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A parser whose help shows defaults; add_subparsers makes every sub-command's parser one too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """argparse's add_argument; an option without help text still shows its default."""
        if kwargs.get("help") is None and kwargs.get("default") is not None:
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


def _train(args: argparse.Namespace) -> int:
    from hpcdl import comm, config, trace
    from hpcdl.faults import Injector
    from hpcdl.train import train

    if args.threads is not None and args.threads < 1:
        raise HpcdlError(f"--threads {args.threads}: must be >= 1 (torch threads per rank)")
    world = comm.init(verbose=args.verbose, threads=args.threads)
    cfg, faults = world.agree(
        lambda: (config.load(args.config, args.set), Injector(args.fault, world.rank, world.size))
    )
    if args.trace:
        world.agree(lambda: trace.check_path(args.trace, args.overwrite))
        trace.start()
    summary = train(cfg, world, resume=args.resume, faults=faults, overwrite=args.overwrite)
    if args.trace:
        events = world.agree(lambda: trace.finish(world, args.trace))
        world.log(f"trace: {events:,} events from {world.size} ranks in {args.trace} (open in ui.perfetto.dev)")
    # A run stopped by SIGTERM/SIGUSR1/SIGINT has checkpointed; 75 tells the batch script to requeue it.
    return comm.EXIT_REQUEUE if summary.get("stopped_by") else 0


def _checkpoint_info(args: argparse.Namespace) -> int:
    from hpcdl import checkpoint

    print(checkpoint.info(args.path))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from hpcdl.plot import plot_run

    for path in plot_run(args.run_dir, args.out, args.overwrite):
        print(path)
    return 0


def _bench(module, args: argparse.Namespace) -> int:
    """One benchmark, its output files checked before the measurements (which take minutes)."""
    from hpcdl.outputs import check_new_file

    for flag in ("json", "plot"):
        if getattr(args, flag, None):
            check_new_file(f"--{flag}", getattr(args, flag), args.overwrite)
    module.run(args)
    return 0


def _add_benchmarks(commands) -> None:
    from hpcdl.bench import allreduce, comm, compress, dp, infer, io, pipeline, strategies, zero

    bench = commands.add_parser("bench", help="benchmarks: hpcdl and its peers side by side, ratios printed")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    for name, module, summary in (
        ("dp", dp, "data parallel vs PyTorch DDP (gloo) vs one process"),
        ("allreduce", allreduce, "bucketed gradient sync vs one contiguous Allreduce"),
        ("comm", comm, "latency and bandwidth of MPI collectives over message sizes, fitted alpha-beta model"),
        ("io", io, "loader throughput (block/global/chunked; streamed/warm/cached) vs sequential reads, DLIO-style"),
        ("pipeline", pipeline, "GPipe/1F1B pipeline vs torch.distributed.pipelining vs one process, bubble"),
        ("infer", infer, "distributed scoring, static vs dynamic schedule (one rank slowed) vs a plain torch loop"),
        ("strategies", strategies, "data parallel vs parameter servers (sync, async) vs local SGD: speed, bytes, time"),
        ("zero", zero, "data parallel vs ZeRO-1/2 vs torch ZeroRedundancyOptimizer: speed, memory per rank"),
        ("compress", compress, "teacher vs student alone vs distilled (online, precomputed) vs int8: accuracy, speed"),
    ):
        parser = kinds.add_parser(name, help=summary)
        module.add_arguments(parser)
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --json (or --plot) file")
        parser.set_defaults(func=lambda args, module=module: _bench(module, args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from hpcdl.compress.commands import register as register_prune
    from hpcdl.data.commands import register as register_data
    from hpcdl.infer.commands import register as register_infer
    from hpcdl.scale import register as register_scale
    from hpcdl.slurm import register as register_slurm
    from hpcdl.sweep.commands import register as register_sweep

    parser = _Parser(prog="hpcdl", description="MPI data/model parallel training on HDF5 data")
    parser.add_argument("--version", action="version", version=f"hpcdl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    register_data(commands)

    train = commands.add_parser("train", help="train a model (run under mpirun/srun for several ranks)")
    train.add_argument("--config", required=True, help="a named config (e.g. digits-mlp) or a TOML file")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue from the run's newest valid checkpoint (latest), from a checkpoint file or a run folder (its "
        "newest valid checkpoint), or with `auto` from the "
        "newest valid one if there is one, else start fresh (the same command for first start and restart)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in a run.dir that holds a run: the old run is moved aside to RUN_DIR.old-TIME, never deleted",
    )
    train.add_argument(
        "--fault", action="append", default=[], metavar="KIND@RANK:STEP", help="inject a fault, for tests"
    )
    train.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks on the node)")
    train.add_argument("--verbose", action="store_true", help="let every rank log, prefixed with its rank")
    train.add_argument("--trace", metavar="FILE", help="write every rank's timeline to FILE (Chrome trace JSON)")
    train.set_defaults(func=_train)
    ckpt = commands.add_parser("checkpoint", help="inspect checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="action", required=True)
    info = ckpt_commands.add_parser("info", help="step, epoch, world size, config and parameter digest")
    info.add_argument("path", help="a checkpoint file, or a run folder (its newest valid checkpoint)")
    info.set_defaults(func=_checkpoint_info)
    plot = commands.add_parser("plot", help="a run's metrics.jsonl as PNGs: loss, per-epoch metrics, learning rate")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a training run's folder (its run.dir)")
    plot.add_argument("--out", metavar="FOLDER", help="where the PNGs go (default: RUN_DIR)")
    plot.add_argument("--overwrite", action="store_true", help="replace PNGs an earlier plot wrote there")
    plot.set_defaults(func=_plot)
    register_infer(commands)
    register_prune(commands)
    register_sweep(commands)
    _add_benchmarks(commands)
    register_scale(commands)
    register_slurm(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hpcdl` and `python -m hpcdl`."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HpcdlError as exc:
        print(f"hpcdl: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`hpcdl data info F | head -2`): what it did not read is not an error of ours. Python would
        # report the pipe again when it flushes stdout at exit, so stdout is pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a C tool killed by the signal reports
