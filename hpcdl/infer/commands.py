"""`hpcdl infer`, `hpcdl evaluate` and `hpcdl export`: the command line of scoring."""

from __future__ import annotations

import argparse
from pathlib import Path

EVALUATION_FOLDER = "eval-{split}"  # evaluate's default report folder, inside the checkpoint's run folder


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder (its newest valid checkpoint) or a checkpoint"
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="the HDF5 file to score")
    parser.add_argument("--split", default="val", help="the split to score: any group of the file holding x")
    parser.add_argument(
        "--schedule", default="static", help="static: an even block per rank; dynamic: chunks claimed on demand"
    )
    parser.add_argument("--batch", type=int, default=1024, help="rows per batch, and per dynamic chunk")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks on the node)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="let every rank log, prefixed with its rank")
    parser.add_argument(
        "--quantize", default="none", help="int8: score with Linear/LSTM layers as dynamic int8 (none: as trained)"
    )


def _world(args: argparse.Namespace):
    """This job's world, with the torch threads asked for."""
    from hpcdl import comm
    from hpcdl.errors import HpcdlError

    if args.threads is not None and args.threads < 1:
        raise HpcdlError(f"--threads {args.threads}: must be >= 1 (torch threads per rank)")
    return comm.init(verbose=args.verbose, threads=args.threads)


def _job(world, args: argparse.Namespace, out: str | None, need_labels: bool):
    """The checked job (every rank, every input checked before scoring)."""
    from hpcdl.infer.engine import Request, prepare

    outputs = tuple(name.strip() for name in getattr(args, "outputs", "class").split(",") if name.strip())
    request = Request(
        args.data, args.split, outputs, args.schedule, args.batch, progress=args.progress, out=out,
        quantize=args.quantize, overwrite=args.overwrite,
    )  # fmt: skip
    job = prepare(world, request, args.checkpoint, need_labels=need_labels)
    for note in job.notes:
        world.log(f"hpcdl: {note}")
    world.log(
        f"hpcdl: scoring {job.source.rows:,} samples of {args.data} /{args.split} with {job.model.name} from "
        f"{job.model.source} on {world.size} rank(s), schedule {args.schedule}, batch {args.batch}"
    )
    return job


def _said(world, scored) -> None:
    """The pass's figures, from rank 0."""
    per_rank = "/".join(f"{rows:,}" for rows in scored.rows_per_rank)
    world.log(
        f"hpcdl: scored {scored.rows:,} samples in {scored.seconds:.2f} s ({scored.samples_per_s:,.0f} samples/s); "
        f"rows per rank {per_rank}"
    )


def _infer(args: argparse.Namespace) -> int:
    from hpcdl.infer.engine import run
    from hpcdl.infer.metrics import table

    world = _world(args)
    job = _job(world, args, args.out, need_labels=False)
    scored = run(world, job)
    _said(world, scored)
    if scored.metrics:
        world.log(table(scored.metrics))
    world.log(f"hpcdl: wrote {scored.out}")
    return 0


def report_folder(target: str | Path, split: str) -> Path:
    """Where evaluate writes by default: eval-SPLIT in the run folder named, or the one its checkpoint belongs to."""
    path = Path(target)
    run_dir = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / EVALUATION_FOLDER.format(split=split)


def check_report_folder(folder: Path, overwrite: bool) -> None:
    """The report folder is a folder (or can be made one) that can be written, holding no report unless `overwrite`."""
    from hpcdl.infer.metrics import REPORT_FILES
    from hpcdl.outputs import check_new_folder, existing_output

    check_new_folder("--out-dir", folder)
    found = [name for name in REPORT_FILES if (folder / name).exists()]
    if found and not overwrite:
        raise existing_output("--out-dir", folder, f"already holds an evaluation report ({', '.join(found)})")


def _evaluate(args: argparse.Namespace) -> int:
    from hpcdl.infer.engine import run
    from hpcdl.infer.metrics import report_files, table, write_report

    world = _world(args)
    # The default folder lies beside the checkpoint: while that names nothing, its own check says so first.
    folder = Path(args.out_dir) if args.out_dir else report_folder(args.checkpoint, args.split)
    if args.out_dir or Path(args.checkpoint).exists():
        world.agree(lambda: check_report_folder(folder, args.overwrite) if world.is_root else None)
    job = _job(world, args, None, need_labels=True)
    scored = run(world, job)
    _said(world, scored)
    world.log(table(scored.metrics))
    about = {"checkpoint": job.model.source, "data": str(args.data), "split": args.split, "ranks": world.size,
             "quantize": args.quantize, "seconds": scored.seconds, "samples_per_s": scored.samples_per_s}  # fmt: skip
    written = world.agree(lambda: write_report(folder, report_files(scored.metrics, about)) if world.is_root else None)
    world.log(f"hpcdl: wrote {', '.join(written or [])} in {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from hpcdl.export import export

    path, tensors = export(args.checkpoint, args.out, args.overwrite)
    print(f"hpcdl: wrote {tensors} tensors of {args.checkpoint} to {path}")
    return 0


def _overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists (else refused)")


def register(commands) -> None:
    """Add infer, evaluate and export to the top-level subcommands."""
    infer = commands.add_parser("infer", help="score a split on N ranks into one HDF5 file, in sample order")
    _scoring_options(infer)
    infer.add_argument("--out", required=True, metavar="FILE", help="the predictions' .h5 file (written when done)")
    infer.add_argument("--outputs", default="class", help="what to write per sample: class,probs,logits")
    _overwrite_option(infer, "the --out file")
    infer.set_defaults(func=_infer)
    evaluate = commands.add_parser("evaluate", help="loss, accuracy, per-class precision/recall/F1, confusion matrix")
    _scoring_options(evaluate)
    evaluate.add_argument("--out-dir", help="where metrics.json, confusion.csv/.png go (default: RUN/eval-SPLIT)")
    _overwrite_option(evaluate, "the report in --out-dir")
    evaluate.set_defaults(func=_evaluate)
    export = commands.add_parser("export", help="a checkpoint's weights alone, as .safetensors or weights-only .pt")
    export.add_argument("checkpoint", help="a run folder (its newest valid checkpoint) or a checkpoint file")
    export.add_argument(
        "--out", required=True, help="FILE.safetensors, or FILE.pt / FILE.pth (a state dict for torch.load)"
    )
    _overwrite_option(export, "the --out file")
    export.set_defaults(func=_export)
