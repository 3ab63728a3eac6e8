"""The command line: hpcdl data | train | bench."""

from __future__ import annotations

import argparse
import sys

from hpcdl.errors import HpcdlError


def _train(args: argparse.Namespace) -> int:
    from hpcdl import comm, config
    from hpcdl.train import train

    world = comm.init(verbose=args.verbose, threads=args.threads)
    cfg = world.agree(lambda: config.load(args.config, args.set))
    train(cfg, world, resume=args.resume)
    return 0


def _add_benchmarks(commands) -> None:
    from hpcdl.bench import allreduce, dp

    bench = commands.add_parser("bench", help="benchmarks: hpcdl and its peers side by side, ratios printed")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    for name, module, summary in (
        ("dp", dp, "data parallel vs PyTorch DDP (gloo) vs one process"),
        ("allreduce", allreduce, "bucketed gradient sync vs one contiguous Allreduce"),
    ):
        parser = kinds.add_parser(name, help=summary)
        module.add_arguments(parser)
        parser.set_defaults(func=lambda args, module=module: module.run(args) and 0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from hpcdl.data.commands import register as register_data

    parser = argparse.ArgumentParser(prog="hpcdl", description="MPI data/model parallel training on HDF5 data")
    commands = parser.add_subparsers(dest="command", required=True)
    register_data(commands)

    train = commands.add_parser("train", help="train a model (run under mpirun/srun for several ranks)")
    train.add_argument("--config", required=True, help="a named config (e.g. digits-mlp) or a TOML file")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    train.add_argument(
        "--resume", nargs="?", const="latest", help="continue from the run's latest checkpoint, or from PATH"
    )
    train.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks on the node)")
    train.add_argument("--verbose", action="store_true", help="let every rank log, prefixed with its rank")
    train.set_defaults(func=_train)
    _add_benchmarks(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hpcdl` and `python -m hpcdl`."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HpcdlError as exc:
        print(f"hpcdl: error: {exc}", file=sys.stderr)
        return 2
