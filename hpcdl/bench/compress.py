"""`hpcdl bench compress`: smaller, faster models side by side. The dense model (also the teacher); pruned to 50/80/90%
of its weights (unstructured, the `[prune]` cubic ramp during training); 50% of its hidden neurons (structured,
`hpcdl prune --structured l2`: a physically smaller MLP), one-shot and fine-tuned (`train.init`); a student half its
width trained alone and distilled from it (online and from precomputed logits); int8 inference of the best.

Every model is made by hpcdl's own code paths (`train`, `hpcdl prune`'s `prune_run`, `infer --outputs logits`), run
in one process under mpiexec (one rank, one thread) so that each job's time is its own, not Python's start-up:
`train_s` is a job's wall time in that process (after an untimed warm-up of two steps). On the digits set (or
`--data`, any classification file: `hpcdl data make mnist` gives 5,000 real MNIST digits).

Columns: validation accuracy, parameters (and non-zero ones: unstructured pruning zeroes weights, it does not remove
them), file size (model.pt, and gzipped: what sparsity saves once compressed; the int8 model's state dict saved by
torch), inference samples/s at 1 and `--ranks` ranks. The two distillations are timed: online pays a teacher forward
per step; precomputed pays one inference pass over the train split up front, then reads rows. The int8 row quantizes
the best compressed model that was trained (by its run's val_acc).

Scoring runs hpcdl's inference engine (as `hpcdl evaluate` does; one job per rank count) on the validation split
tiled to `--rows` rows (the same accuracy as the split, and enough rows for a rate): a warm-up pass per model, then
`--repeats` rounds in which every model is scored once (interleaved, so that machine noise hits all alike); rates
are the medians. The structured model's speed-up over the dense one is the median over rounds of the ratio of their
rates in the same round.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdl.bench.common import median, provenance_line, run_worker, spread, write_json
from hpcdl.errors import HpcdlError
from hpcdl.studies import mpiexec, provenance, table

CONFIG = "digits-mlp"  # every training's base config (Adam at lr 0.003, batch 64); the bench sets the rest
# The unstructured ramp, as fractions of the run's steps: prune from 20% to 70%, then train on with the masks kept.
RAMP = (0.2, 0.7)


@dataclass
class Row:
    """One model of the table: a run folder scored as it is, or quantized."""

    name: str
    run_dir: Path
    made_by: tuple[str, ...] = ()  # the jobs that made it (their seconds add up to its train_s)
    quantize: str = "none"
    candidate: bool = True  # a compressed model that was trained (has summary.json): may be the best, for int8
    train_s: float | None = None  # seconds of the jobs that made it (in the jobs' process)


def _train_job(name: str, run_dir: Path, config: str, sets: list[str]) -> dict[str, Any]:
    return {"name": name, "kind": "train", "config": config, "sets": [f"run.dir='{run_dir}'", *sets]}


def _jobs_worker(opts: argparse.Namespace) -> None:
    """Under mpiexec -n 1: run the jobs in order (train, prune, logits) in this process; print each one's seconds."""
    from hpcdl import comm, config
    from hpcdl.compress.commands import prune_run
    from hpcdl.infer.engine import Request, prepare
    from hpcdl.infer.engine import run as score
    from hpcdl.train import train

    world = comm.init(threads=1)
    jobs = json.loads(Path(opts.jobs).read_text())
    first = next(job for job in jobs if job["kind"] == "train")
    # Untimed: two steps of the first training, so that no job's time holds the process's first-use costs.
    warm_up = [*first["sets"], f"run.dir='{Path(opts.jobs).parent / 'warm-up'}'", "train.max_steps=2"]
    train(config.load(first["config"], warm_up), world, resume=None, overwrite=True)
    seconds = {}
    for job in jobs:
        began = time.perf_counter()
        if job["kind"] == "train":
            train(config.load(job["config"], job["sets"]), world, resume=None, overwrite=True)
        elif job["kind"] == "prune":
            prune_run(job["run"], job["out"], 0.0, "l2", job["fraction"])
        else:  # the teacher's logits of the train split, as `hpcdl infer --outputs logits` writes them
            request = Request(job["data"], "train", ("logits",), batch=1024, progress=False, out=job["out"])
            score(world, prepare(world, request, job["run"]))
        seconds[job["name"]] = time.perf_counter() - began
    print(json.dumps({"seconds": seconds}))


def _score_worker(opts: argparse.Namespace) -> None:
    """Under mpiexec: each (run folder, quantize) through hpcdl's inference engine, a warm-up pass each, then
    `--repeats` interleaved rounds; rank 0 prints JSON."""
    from hpcdl import comm
    from hpcdl.infer.engine import Request, prepare
    from hpcdl.infer.engine import run as score

    world = comm.init(threads=1)
    jobs = []
    for run_dir, quantize in json.loads(opts.models):
        request = Request(opts.data, "val", batch=opts.batch, progress=False, quantize=quantize)
        jobs.append(prepare(world, request, run_dir, need_labels=True))
        score(world, jobs[-1])  # warm-up: the same pass, untimed
    rounds = [[score(world, job) for job in jobs] for _ in range(opts.repeats)]
    scored = [
        {"accuracy": done[0].metrics["accuracy"], "loss": done[0].metrics["loss"], "rows": done[0].rows,
         "samples_per_s": [d.samples_per_s for d in done]}
        for done in zip(*rounds)
    ]  # fmt: skip
    if world.is_root:
        print(json.dumps({"scored": scored}))


def _score(rows: list[Row], data: Path, ranks: int, opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row's model scored on `data`'s validation split by one job of `ranks` ranks."""
    command = [
        *mpiexec(), "-n", str(ranks), sys.executable, "-m", "hpcdl.bench.compress", "--worker", "score",
        "--data", str(data), "--batch", str(opts.batch), "--repeats", str(opts.repeats),
        "--models", json.dumps([[str(row.run_dir), row.quantize] for row in rows]),
    ]  # fmt: skip
    return run_worker(command, timeout=1800)["scored"]


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


def _train_rows(data: Path) -> int:
    import h5py

    with h5py.File(data, "r") as file:
        return len(file["train/y"])


def _sizes(row: Row, data: Path, folder: Path) -> dict[str, int]:
    """Parameters, non-zero ones, and bytes of the saved weights (model.pt, or the int8 model's state dict), gzipped."""
    import torch

    from hpcdl.infer.inputs import describe_split
    from hpcdl.infer.model import from_checkpoint
    from hpcdl.infer.quantize import int8

    model = from_checkpoint(str(row.run_dir), describe_split(str(data), "val"), [])
    params = list(model.module.parameters())
    path = row.run_dir / "model.pt"
    if row.quantize != "none":
        path = folder / f"{row.name}.pt"
        torch.save(int8(model).module.state_dict(), path)
    saved = path.read_bytes()
    return {"params": sum(p.numel() for p in params), "nonzero_params": sum(int(p.count_nonzero()) for p in params),
            "file_bytes": len(saved), "file_gzip_bytes": len(gzip.compress(saved, 6))}  # fmt: skip


def _val_acc(row: Row) -> float:
    return json.loads((row.run_dir / "summary.json").read_text())["val_acc"]


def structured_name(opts: argparse.Namespace) -> str:
    """The structured rows' name."""
    return f"structured {opts.fraction:.0%}"


def finetuned_name(opts: argparse.Namespace) -> str:
    """The fine-tuned structured row's name."""
    return f"{structured_name(opts)} + {opts.finetune_epochs} epochs"


def _hidden(run_dir: Path) -> list[int]:
    """A trained run's MLP widths, from its newest checkpoint's config."""
    from hpcdl import checkpoint

    return list(checkpoint.load(checkpoint.locate(str(run_dir), [], "--teacher"))["config"]["model"]["hidden"])


def _plan(opts: argparse.Namespace, folder: Path, data: Path, teacher: Path) -> tuple[list[dict], list[Row], dict]:
    """The jobs (in order: each one's inputs made by an earlier one) and the table's rows."""
    teacher_hidden = _hidden(teacher) if opts.teacher else [int(v) for v in opts.teacher_hidden.split(",")]
    student_hidden = [max(1, width // 2) for width in teacher_hidden]
    base = [f"data.path='{data}'", f"train.epochs={opts.epochs}", "run.progress=false"]
    dense = [*base, f"model.hidden={teacher_hidden}"]
    jobs = [] if opts.teacher else [_train_job("dense", teacher, CONFIG, dense)]
    rows = [Row("dense (teacher)", teacher, () if opts.teacher else ("dense",), candidate=False)]
    steps = opts.epochs * math.ceil(_train_rows(data) / 64)  # digits-mlp's batch size
    start, end = (round(fraction * steps) for fraction in RAMP)
    ramp = [f"prune.start={start}", f"prune.end={end}", f"prune.every={max(1, (end - start) // 10)}"]
    for sparsity in opts.sparsities:
        name = f"unstructured {sparsity:.0%}"
        run_dir = folder / f"unstructured-{sparsity}"
        jobs.append(_train_job(name, run_dir, CONFIG, [*dense, f"prune.final_sparsity={sparsity}", *ramp]))
        rows.append(Row(name, run_dir, (name,)))
    smaller, finetuned = folder / "structured", folder / "structured-finetuned"
    jobs.append({"name": "structured", "kind": "prune", "run": str(teacher), "out": str(smaller),
                 "fraction": opts.fraction})  # fmt: skip
    rows.append(Row(f"{structured_name(opts)} one-shot", smaller, ("structured",), candidate=False))
    sets = [f"train.init='{smaller}'", f"train.epochs={opts.finetune_epochs}", "run.progress=false"]
    jobs.append(_train_job("fine-tune", finetuned, str(smaller / "config.toml"), sets))
    rows.append(Row(finetuned_name(opts), finetuned, ("structured", "fine-tune")))
    student = [*base, f"model.hidden={student_hidden}"]
    distill = [f"distill.temperature={opts.temperature}", f"distill.alpha={opts.alpha}"]
    logits = folder / "teacher-logits.h5"
    jobs.append({"name": "logits", "kind": "logits", "run": str(teacher), "data": str(data), "out": str(logits)})
    for name, made_by, sets in [
        ("student alone", (), student),
        ("student distilled online", (), [*student, f"distill.teacher='{teacher}'", *distill]),
        ("student distilled precomputed", ("logits",),
         [*student, "distill.source='precomputed'", f"distill.logits='{logits}'", *distill]),
    ]:  # fmt: skip
        jobs.append(_train_job(name, folder / name.replace(" ", "-"), CONFIG, sets))
        rows.append(Row(name, folder / name.replace(" ", "-"), (*made_by, name)))
    structured_hidden = [max(1, w - round(opts.fraction * w)) for w in teacher_hidden]
    shapes = {"teacher_hidden": teacher_hidden, "student_hidden": student_hidden,
              "structured_hidden": structured_hidden, "ramp_steps": [start, end], "steps": steps}  # fmt: skip
    return jobs, rows, shapes


def _check(opts: argparse.Namespace) -> None:
    """Each option in range, or one line naming it."""
    opts.sparsities = [float(v) for v in str(opts.sparsities).split(",") if v.strip()]
    wrong = [f"--sparsities {v}: each must be > 0 and < 1" for v in opts.sparsities if not 0 < v < 1]
    wrong += [] if 0 < opts.fraction < 1 else [f"--fraction {opts.fraction}: must be > 0 and < 1"]
    for name in ("epochs", "finetune_epochs", "repeats", "ranks", "rows", "batch"):
        if getattr(opts, name) < 1:
            wrong.append(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be >= 1")
    if opts.data and not Path(opts.data).is_file():
        wrong.append(f"--data {opts.data}: no such file (make one: hpcdl data make digits|mnist --out FILE)")
    if wrong:
        raise HpcdlError(f"bench compress: {wrong[0]}")


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Train, prune, fine-tune, distill, quantize and score; print the table; return (and with --json write) it."""
    from hpcdl.data.make import make_digits

    _check(opts)
    with tempfile.TemporaryDirectory(prefix="hpcdl-bench-compress-") as tmp:
        folder = Path(tmp)
        data = Path(opts.data) if opts.data else folder / "digits.h5"
        if not opts.data:
            make_digits(data)
        teacher = Path(opts.teacher) if opts.teacher else folder / "dense"
        jobs, rows, shapes = _plan(opts, folder, data, teacher)
        print(
            f"bench compress: {data}, dense MLP {shapes['teacher_hidden']}, structured {shapes['structured_hidden']},"
            f" student {shapes['student_hidden']}, {opts.epochs} epochs (pruning ramp over steps"
            f" {shapes['ramp_steps'][0]}-{shapes['ramp_steps'][1]} of {shapes['steps']}), scoring at 1 and"
            f" {opts.ranks} rank(s), one thread each, {opts.repeats} rounds"
        )
        (folder / "jobs.json").write_text(json.dumps(jobs))
        command = [*mpiexec(), "-n", "1", sys.executable, "-m", "hpcdl.bench.compress", "--worker", "jobs",
                   "--jobs", str(folder / "jobs.json")]  # fmt: skip
        seconds = run_worker(command, timeout=3600, retries=0)["seconds"]
        for row in rows:
            row.train_s = sum(seconds[job] for job in row.made_by) if row.made_by else None
        rows += [Row(Path(path).name, Path(path), candidate=False) for path in opts.extra]
        best = max((row for row in rows if row.candidate), key=_val_acc)
        rows.append(Row(f"{best.name}, int8", best.run_dir, quantize="int8", candidate=False))
        scoring = _tiled(data, folder / "val-tiled.h5", opts.rows)
        one = _score(rows, scoring, 1, opts)
        many = _score(rows, scoring, opts.ranks, opts) if opts.ranks > 1 else one
        figures = [
            {
                "model": row.name, "quantize": row.quantize, "val_acc": a["accuracy"], "val_loss": a["loss"],
                "samples_per_s_1": median(a["samples_per_s"]), "samples_per_s_n": median(b["samples_per_s"]),
                "spread_1": spread(a["samples_per_s"]), "spread_n": spread(b["samples_per_s"]),
                "samples_per_s_1_rounds": a["samples_per_s"], "samples_per_s_n_rounds": b["samples_per_s"],
                "train_s": row.train_s, "rows": a["rows"], **_sizes(row, data, folder),
            }
            for row, a, b in zip(rows, one, many)
        ]  # fmt: skip
    flat = provenance(opts.ranks, 1)
    flat.update(
        data=str(opts.data or "digits"), scored_rows=figures[0]["rows"], epochs=opts.epochs, **shapes,
        finetune_epochs=opts.finetune_epochs, repeats=opts.repeats, temperature=opts.temperature, alpha=opts.alpha,
        rows=figures, job_seconds={name: round(s, 2) for name, s in seconds.items()}, best=best.name,
    )  # fmt: skip
    by_name = {f["model"]: f for f in figures}
    _compare(flat, by_name, opts, seconds)
    _print(flat, figures, opts)
    write_json(opts.json, flat)
    return flat


def _compare(flat: dict[str, Any], by_name: dict[str, dict], opts: argparse.Namespace, seconds: dict) -> None:
    """The issue's aims, each with its figures: 80% unstructured within 1 point of dense, the distilled student above
    the one alone, structured 50% faster than dense at inference (median rates at 1 and N ranks)."""
    dense = by_name["dense (teacher)"]
    structured = by_name[finetuned_name(opts)]
    # Each round's ratio pairs two passes close in time, so a load that comes and goes cancels out of it.
    for column in ("1", "n"):
        rounds = zip(structured[f"samples_per_s_{column}_rounds"], dense[f"samples_per_s_{column}_rounds"])
        flat[f"structured_speedup_{column}"] = median([a / b for a, b in rounds])
    aims = {"structured faster than dense": flat["structured_speedup_1"] > 1 and flat["structured_speedup_n"] > 1}
    if "unstructured 80%" in by_name:
        aims["unstructured 80% within 1 point of dense"] = by_name["unstructured 80%"]["val_acc"] >= (
            dense["val_acc"] - 0.01
        )
    alone = by_name["student alone"]["val_acc"]
    aims["distilled student above the student alone"] = by_name["student distilled online"]["val_acc"] > alone
    flat["aims"] = aims
    flat["online_train_s"] = round(seconds["student distilled online"], 2)
    flat["precomputed_train_s"] = round(seconds["student distilled precomputed"], 2)
    flat["precomputed_logits_s"] = round(seconds["logits"], 2)
    both = seconds["logits"] + seconds["student distilled precomputed"]
    flat["faster"] = "online" if seconds["student distilled online"] < both else "precomputed"


def _print(flat: dict[str, Any], figures: list[dict], opts: argparse.Namespace) -> None:
    headers = ["model", "val acc", "params (non-zero)", "file KB (gzip)", "samples/s 1 rank",
               f"samples/s {opts.ranks} ranks", "train s"]  # fmt: skip
    print()
    print(
        table(
            headers,
            [
                [f["model"], f"{f['val_acc']:.4f}", f"{f['params']:,} ({f['nonzero_params']:,})",
                 f"{f['file_bytes'] / 1024:.1f} ({f['file_gzip_bytes'] / 1024:.1f})",
                 f"{f['samples_per_s_1']:,.0f}", f"{f['samples_per_s_n']:,.0f}",
                 "" if f["train_s"] is None else f"{f['train_s']:.1f}"]
                for f in figures
            ],
        )
    )  # fmt: skip
    print(
        f"{finetuned_name(opts)} (hidden {flat['structured_hidden']}) vs dense ({flat['teacher_hidden']}): "
        f"x{flat['structured_speedup_1']:.2f} samples/s at 1 rank, x{flat['structured_speedup_n']:.2f} at "
        f"{opts.ranks} (median of {opts.repeats} rounds' ratios)"
    )
    print(
        f"distillation: online {flat['online_train_s']:.1f} s; precomputed {flat['precomputed_train_s']:.1f} s after "
        f"{flat['precomputed_logits_s']:.1f} s of teacher inference: {flat['faster']} is faster once; precomputed "
        "logits serve every further student of the same teacher and data for the cost of reading them"
    )
    print("aims: " + "; ".join(f"{aim}: {'met' if met else 'NOT met'}" for aim, met in flat["aims"].items()))
    print(provenance_line(flat))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    parser.add_argument("--data", help="a classification HDF5 file (default: the digits set, built here)")
    parser.add_argument("--teacher", help="a trained dense run folder to use (default: train one here)")
    parser.add_argument("--teacher-hidden", default="512,512",
                        help="the dense MLP's widths (wide enough that half the neurons score measurably faster); "
                             "the student's are half")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every training from scratch")
    parser.add_argument("--sparsities", default="0.5,0.8,0.9", help="unstructured pruning's final sparsities")
    parser.add_argument("--fraction", type=float, default=0.5, help="structured: each hidden layer's share dropped")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs of fine-tuning the structured model")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the second scoring column")
    parser.add_argument("--batch", type=int, default=256, help="rows per scoring batch")
    parser.add_argument("--rows", type=int, default=30_000, help="rows scored: the validation split repeated")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved scoring rounds (rates are medians)")
    parser.add_argument("--extra", action="append", default=[], metavar="RUN_DIR", help="more run folders to score")
    parser.add_argument("--json", help="write the figures here as one JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", choices=("jobs", "score"), required=True)
    cli.add_argument("--jobs", help="worker jobs: a JSON file of the jobs to run in order")
    cli.add_argument("--models", help="worker score: JSON list of [run folder, quantize]")
    options = cli.parse_args()
    (_jobs_worker if options.worker == "jobs" else _score_worker)(options)
