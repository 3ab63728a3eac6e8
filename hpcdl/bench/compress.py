"""`hpcdl bench compress`: smaller, faster models: a dense teacher, a student half its width trained alone and
distilled from it (online and from precomputed logits), and int8 inference of the best student.

Every model is trained by the hpcdl command line itself (`hpcdl train`, `hpcdl infer`), on the digits set (or
`--data`, any classification file). Columns: validation accuracy, parameters, file size (model.pt; the int8
model's state dict), inference samples/s at 1 and `--ranks` ranks. The two distillations are timed: online pays a
teacher forward per step; precomputed pays one inference pass over the train split up front (`hpcdl infer --outputs
logits`), then reads rows. With the same teacher logits both give the same student (bitwise here), so only the time
differs. The int8 row quantizes the student best by its run's val_acc.

Scoring runs hpcdl's inference engine (as `hpcdl evaluate` does; one job per rank count, a warm-up pass before
each timed one) on the validation split tiled to `--rows` rows (the same accuracy as the split, and enough rows for
a rate). `rows` in `run` is the table's list of models: a new kind of compressed model (e.g. pruned ones from
`hpcdl prune`) is one more entry, a run folder scored like the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdl.bench.common import mpiexec, provenance, provenance_line, run_worker, table, write_json
from hpcdl.errors import HpcdlError


@dataclass
class Row:
    """One model of the table: a trained run scored as it is, or quantized."""

    name: str
    run_dir: Path
    quantize: str = "none"
    train_s: float | None = None  # wall time of its training command(s), from launch to exit


def _hpcdl(ranks: int, *args: str, timeout: float = 600) -> float:
    """Run `python -m hpcdl ARGS` on `ranks` ranks (one thread each); its wall time in seconds."""
    import subprocess

    command = [*mpiexec(), "-n", str(ranks), sys.executable, "-m", "hpcdl", *args]
    began = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise HpcdlError(f"bench compress: timed out after {timeout:.0f} s: {' '.join(command)}") from None
    if done.returncode != 0:
        raise HpcdlError(f"bench compress: {' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-1500:]}")
    return time.perf_counter() - began


def _train(data: Path, run_dir: Path, hidden: list[int], opts: argparse.Namespace, *extra: str) -> float:
    sets = [
        f"data.path='{data}'", f"run.dir='{run_dir}'", f"model.hidden={hidden}", f"train.epochs={opts.epochs}",
        "run.progress=false", *extra,
    ]  # fmt: skip
    args = ["train", "--config", "digits-mlp", "--threads", "1", "--overwrite"]
    for assignment in sets:
        args += ["--set", assignment]
    return _hpcdl(1, *args)


def _score(rows: list[Row], data: Path, ranks: int, opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row's model scored on `data`'s validation split by one job of `ranks` ranks (a warm-up pass first)."""
    command = [
        *mpiexec(), "-n", str(ranks), sys.executable, "-m", "hpcdl.bench.compress", "--worker", "--data", str(data),
        "--batch", str(opts.batch), "--models", json.dumps([[str(row.run_dir), row.quantize] for row in rows]),
    ]  # fmt: skip
    return run_worker(command)["scored"]


def _worker(opts: argparse.Namespace) -> None:
    """Under mpiexec: score each (run folder, quantize) through hpcdl's inference engine; rank 0 prints JSON."""
    from hpcdl import comm
    from hpcdl.infer.engine import Request, prepare
    from hpcdl.infer.engine import run as score

    world = comm.init(threads=1)
    scored = []
    for run_dir, quantize in json.loads(opts.models):
        request = Request(opts.data, "val", batch=opts.batch, progress=False, quantize=quantize)
        job = prepare(world, request, run_dir, need_labels=True)
        score(world, job)  # warm-up: the same pass, untimed
        done = score(world, job)
        scored.append({"accuracy": done.metrics["accuracy"], "loss": done.metrics["loss"], "rows": done.rows,
                       "samples_per_s": done.samples_per_s})  # fmt: skip
    if world.is_root:
        print(json.dumps({"scored": scored}))


def _tiled(data: Path, out: Path, rows: int) -> Path:
    """A copy of `data`'s validation split repeated to `rows` rows (its attributes kept), for scoring rates."""
    import h5py
    import numpy as np

    with h5py.File(data, "r") as source, h5py.File(out, "w") as target:
        target.attrs.update(dict(source.attrs))
        x, y = source["val/x"][...], source["val/y"][...]
        take = np.arange(max(rows, len(y))) % len(y)
        group = target.create_group("val")
        group.create_dataset("x", data=x[take])
        group.create_dataset("y", data=y[take])
    return out


def _sizes(row: Row, data: Path, folder: Path) -> tuple[int, int]:
    """(parameters, bytes of the saved weights): model.pt, or the int8 model's state dict saved by torch."""
    import torch

    from hpcdl.infer.inputs import describe_split
    from hpcdl.infer.model import from_checkpoint
    from hpcdl.infer.quantize import int8

    model = from_checkpoint(str(row.run_dir), describe_split(str(data), "val"), [])
    params = sum(p.numel() for p in model.module.parameters())
    if row.quantize == "none":
        return params, (row.run_dir / "model.pt").stat().st_size
    path = folder / f"{row.name}.pt"
    torch.save(int8(model).module.state_dict(), path)
    return params, path.stat().st_size


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Train, distill, quantize and score; print the table; return (and with --json write) the figures."""
    from hpcdl.data.make import make_digits

    teacher_hidden = [int(v) for v in opts.teacher_hidden.split(",")]
    student_hidden = [max(1, width // 2) for width in teacher_hidden]
    with tempfile.TemporaryDirectory(prefix="hpcdl-bench-compress-") as tmp:
        folder = Path(tmp)
        data = Path(opts.data) if opts.data else folder / "digits.h5"
        if not opts.data:
            make_digits(data)
        print(
            f"bench compress: {data}, teacher MLP {teacher_hidden}, student {student_hidden}, {opts.epochs} epochs, "
            f"scoring at 1 and {opts.ranks} rank(s), one thread each"
        )
        teacher = Path(opts.teacher) if opts.teacher else folder / "teacher"
        teacher_s = None if opts.teacher else _train(data, teacher, teacher_hidden, opts)
        alone = folder / "student-alone"
        alone_s = _train(data, alone, student_hidden, opts)
        distill = [f"distill.temperature={opts.temperature}", f"distill.alpha={opts.alpha}"]
        online = folder / "student-online"
        online_s = _train(data, online, student_hidden, opts, f"distill.teacher='{teacher}'", *distill)
        logits = folder / "teacher-logits.h5"
        logits_s = _hpcdl(
            1, "infer", "--checkpoint", str(teacher), "--data", str(data), "--split", "train", "--outputs", "logits",
            "--out", str(logits), "--threads", "1", "--no-progress",
        )  # fmt: skip
        precomputed = folder / "student-precomputed"
        precomputed_s = _train(
            data, precomputed, student_hidden, opts,
            "distill.source='precomputed'", f"distill.logits='{logits}'", *distill,
        )  # fmt: skip
        rows = [
            Row("teacher", teacher, train_s=teacher_s),
            Row("student alone", alone, train_s=alone_s),
            Row("student distilled online", online, train_s=online_s),
            Row("student distilled precomputed", precomputed, train_s=logits_s + precomputed_s),
        ]
        # Pruned models (hpcdl prune) join the table here: rows.append(Row("pruned 50%", RUN_DIR, train_s=...)).
        rows += [Row(Path(path).name, Path(path)) for path in opts.extra]
        scoring = _tiled(data, folder / "val-tiled.h5", opts.rows)
        students = [row for row in rows if row.name.startswith("student")]
        best = max(students, key=lambda row: json.loads((row.run_dir / "summary.json").read_text())["val_acc"])
        rows.append(Row(f"{best.name} int8", best.run_dir, "int8"))
        one = _score(rows, scoring, 1, opts)
        many = _score(rows, scoring, opts.ranks, opts) if opts.ranks > 1 else one
        figures = [
            {
                "model": row.name, "quantize": row.quantize, "val_acc": a["accuracy"], "val_loss": a["loss"],
                "samples_per_s_1": a["samples_per_s"], "samples_per_s_n": b["samples_per_s"], "train_s": row.train_s,
                "rows": a["rows"], "params": size[0], "file_bytes": size[1],
            }
            for row, a, b, size in zip(rows, one, many, (_sizes(row, data, folder) for row in rows))
        ]  # fmt: skip
    flat = provenance(opts.ranks, 1)
    flat.update(
        data=str(opts.data or "digits"), scored_rows=figures[0]["rows"], epochs=opts.epochs,
        teacher_hidden=teacher_hidden, student_hidden=student_hidden, temperature=opts.temperature,
        alpha=opts.alpha, rows=figures, online_train_s=round(online_s, 2), precomputed_train_s=round(precomputed_s, 2),
        precomputed_logits_s=round(logits_s, 2), best_student=best.name,
    )  # fmt: skip
    both = logits_s + precomputed_s
    flat["faster"] = "online" if online_s < both else "precomputed"
    headers = ["model", "val acc", "params", "file KB", "samples/s 1 rank", f"samples/s {opts.ranks} ranks", "train s"]
    print()
    print(
        table(
            headers,
            [
                [f["model"], f"{f['val_acc']:.4f}", f"{f['params']:,}", f"{f['file_bytes'] / 1024:.1f}",
                 f"{f['samples_per_s_1']:,.0f}", f"{f['samples_per_s_n']:,.0f}",
                 "" if f["train_s"] is None else f"{f['train_s']:.1f}"]
                for f in figures
            ],
        )
    )  # fmt: skip
    print(
        f"distillation: online {online_s:.1f} s; precomputed {precomputed_s:.1f} s after {logits_s:.1f} s of teacher "
        f"inference ({both:.1f} s in all): {flat['faster']} is faster once; precomputed logits serve every further "
        "student of the same teacher and data for the cost of reading them"
    )
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    parser.add_argument("--data", help="a classification HDF5 file (default: the digits set, built here)")
    parser.add_argument("--teacher", help="a trained teacher run folder to use (default: train one here)")
    parser.add_argument("--teacher-hidden", default="128,64", help="the teacher MLP's widths; the student's are half")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every training")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the second scoring column")
    parser.add_argument("--batch", type=int, default=256, help="rows per scoring batch")
    parser.add_argument("--rows", type=int, default=30_000, help="rows scored: the validation split repeated")
    parser.add_argument("--extra", action="append", default=[], metavar="RUN_DIR", help="more run folders to score")
    parser.add_argument("--json", help="write the figures here as one JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", action="store_true")
    cli.add_argument("--models", help="worker: JSON list of [run folder, quantize]")
    _worker(cli.parse_args())
