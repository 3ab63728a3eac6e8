"""The command line: hpcdl data | train | checkpoint | infer | evaluate | export | bench | scale | slurm."""

from __future__ import annotations

import argparse
import sys

from hpcdl.errors import HpcdlError


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
        world.agree(lambda: trace.check_path(args.trace))
        trace.start()
    summary = train(cfg, world, resume=args.resume, faults=faults, overwrite=args.overwrite)
    if args.trace:
        events = trace.finish(world, args.trace)
        world.log(f"trace: {events:,} events from {world.size} ranks in {args.trace} (open in ui.perfetto.dev)")
    # A run stopped by SIGTERM/SIGUSR1/SIGINT has checkpointed; 75 tells the batch script to requeue it.
    return comm.EXIT_REQUEUE if summary.get("stopped_by") else 0


def _checkpoint_info(args: argparse.Namespace) -> int:
    from hpcdl import checkpoint

    print(checkpoint.info(args.path))
    return 0


def _add_benchmarks(commands) -> None:
    from hpcdl.bench import allreduce, comm, dp, infer, io, pipeline

    bench = commands.add_parser("bench", help="benchmarks: hpcdl and its peers side by side, ratios printed")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    for name, module, summary in (
        ("dp", dp, "data parallel vs PyTorch DDP (gloo) vs one process"),
        ("allreduce", allreduce, "bucketed gradient sync vs one contiguous Allreduce"),
        ("comm", comm, "latency and bandwidth of MPI collectives over message sizes, fitted alpha-beta model"),
        ("io", io, "loader throughput (block/global, cached/streamed) vs plain sequential reads, DLIO-style"),
        ("pipeline", pipeline, "GPipe/1F1B pipeline vs torch.distributed.pipelining vs one process, bubble"),
        ("infer", infer, "distributed scoring, static vs dynamic schedule (one rank slowed) vs a plain torch loop"),
    ):
        parser = kinds.add_parser(name, help=summary)
        module.add_arguments(parser)
        parser.set_defaults(func=lambda args, module=module: module.run(args) and 0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from hpcdl.data.commands import register as register_data
    from hpcdl.infer.commands import register as register_infer
    from hpcdl.scale import register as register_scale
    from hpcdl.slurm import register as register_slurm

    parser = argparse.ArgumentParser(prog="hpcdl", description="MPI data/model parallel training on HDF5 data")
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
        help="continue from the run's newest valid checkpoint (latest), from PATH, or with `auto` from the "
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
    register_infer(commands)
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
