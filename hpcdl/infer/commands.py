"""`hpcdl infer`, `hpcdl evaluate` and `hpcdl export`: the command line of scoring."""

from __future__ import annotations

import argparse
import os
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


def _start(args: argparse.Namespace, out: str | None, need_labels: bool):
    """The world and the checked job (every rank, every input checked before scoring)."""
    from hpcdl import comm
    from hpcdl.errors import HpcdlError
    from hpcdl.infer.engine import Request, prepare

    if args.threads is not None and args.threads < 1:
        raise HpcdlError(f"--threads {args.threads}: must be >= 1 (torch threads per rank)")
    world = comm.init(verbose=args.verbose, threads=args.threads)
    outputs = tuple(name.strip() for name in getattr(args, "outputs", "class").split(",") if name.strip())
    request = Request(
        args.data, args.split, outputs, args.schedule, args.batch, progress=args.progress, out=out,
        quantize=args.quantize,
    )  # fmt: skip
    job = prepare(world, request, args.checkpoint, need_labels=need_labels)
    for note in job.notes:
        world.log(f"hpcdl: {note}")
    world.log(
        f"hpcdl: scoring {job.source.rows:,} samples of {args.data} /{args.split} with {job.model.name} from "
        f"{job.model.source} on {world.size} rank(s), schedule {args.schedule}, batch {args.batch}"
    )
    return world, job


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

    world, job = _start(args, args.out, need_labels=False)
    scored = run(world, job)
    _said(world, scored)
    if scored.metrics:
        world.log(table(scored.metrics))
    world.log(f"hpcdl: wrote {scored.out}")
    return 0


def report_folder(checkpoint: Path, split: str) -> Path:
    """Where evaluate writes by default: eval-SPLIT in the run folder the checkpoint belongs to."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_dir / EVALUATION_FOLDER.format(split=split)


def check_report_folder(folder: Path) -> None:
    """The report folder is a folder (or can be made one) that can be written."""
    from hpcdl.errors import HpcdlError

    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise HpcdlError(f"--out-dir {folder}: {existing} is not a folder; choose another --out-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HpcdlError(f"--out-dir {folder}: {existing} is not writable; choose another --out-dir")


def _evaluate(args: argparse.Namespace) -> int:
    from hpcdl.infer.engine import run
    from hpcdl.infer.metrics import report_files, table, write_report

    world, job = _start(args, None, need_labels=True)
    folder = Path(args.out_dir) if args.out_dir else report_folder(Path(job.model.source), args.split)
    world.agree(lambda: check_report_folder(folder) if world.is_root else None)
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

    path, tensors = export(args.checkpoint, args.out)
    print(f"hpcdl: wrote {tensors} tensors of {args.checkpoint} to {path}")
    return 0


def register(commands) -> None:
    """Add infer, evaluate and export to the top-level subcommands."""
    infer = commands.add_parser("infer", help="score a split on N ranks into one HDF5 file, in sample order")
    _scoring_options(infer)
    infer.add_argument("--out", required=True, metavar="FILE", help="the predictions' .h5 file (replaced when done)")
    infer.add_argument("--outputs", default="class", help="what to write per sample: class,probs,logits")
    infer.set_defaults(func=_infer)
    evaluate = commands.add_parser("evaluate", help="loss, accuracy, per-class precision/recall/F1, confusion matrix")
    _scoring_options(evaluate)
    evaluate.add_argument("--out-dir", help="where metrics.json, confusion.csv/.png go (default: RUN/eval-SPLIT)")
    evaluate.set_defaults(func=_evaluate)
    export = commands.add_parser("export", help="a checkpoint's weights alone, as .safetensors or weights-only .pt")
    export.add_argument("checkpoint", help="a run folder (its newest valid checkpoint) or a checkpoint file")
    export.add_argument("--out", required=True, help="FILE.safetensors, or FILE.pt (a state dict for torch.load)")
    export.set_defaults(func=_export)
