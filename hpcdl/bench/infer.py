"""`hpcdl bench infer`: distributed scoring, static vs dynamic schedule, against a plain single-process torch loop.

The same MLP (seeded) scores the same synthetic split in every variant, end to end: from the data file to a
complete output file of class and probs. hpcdl runs `hpcdl.predict` at 1 rank and at `--ranks` ranks, static and
dynamic, and at `--ranks` ranks with the last rank slowed down: its model sleeps after each batch as long as the
batch took, so it scores at half speed (an uneven node). Each round launches the torch loop, the 1-rank job and the
N-rank job. A job warms up with one untimed pass, then runs its variants in order and again in reverse (A B B A:
a drift of the machine's speed weighs on each alike); rounds repeat. Rates are medians over rounds; each ratio is
the median over rounds of the ratio within one job, whose variants ran minutes apart at most.
Run as `python -m hpcdl.bench.infer --worker ...` it is a worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdl.bench.common import interleaved, median, provenance_line, run_worker, spread, write_json
from hpcdl.studies import mpiexec, provenance, table

if TYPE_CHECKING:
    from torch import nn

SPLIT, WARMUP_SPLIT = "train", "val"  # the split timed, and the small one that warms every job up
VAL_FRACTION = 0.02
VARIANTS = ("static", "dynamic", "static-slowed", "dynamic-slowed")


def _slowed(inner: nn.Module) -> nn.Module:
    """`inner` wrapped to sleep after each batch as long as the batch took: the same answers at half the speed."""
    import torch
    from torch import nn

    class Slowed(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """The inner model's output, late."""
            began = time.perf_counter()
            out = self.inner(x)
            time.sleep(time.perf_counter() - began)
            return out

    return Slowed(inner)


def _model(opts: argparse.Namespace) -> nn.Module:
    import torch

    from hpcdl.models import MLP

    torch.manual_seed(0)
    return MLP(opts.features, [int(h) for h in opts.hidden.split(",")], opts.classes)


def _torch_worker(opts: argparse.Namespace) -> None:
    """The loop a user writes in one process: read the split, score it batch by batch, write class and probs."""
    import h5py
    import numpy as np
    import torch

    torch.set_num_threads(opts.threads)
    model = _model(opts).eval()
    began = time.perf_counter()
    with h5py.File(opts.data, "r") as file:
        x = torch.from_numpy(file[f"{SPLIT}/x"][:])
    classes, probs = [], []
    with torch.inference_mode():
        for start in range(0, len(x), opts.batch):
            logits = model(x[start : start + opts.batch])
            classes.append(logits.argmax(dim=1).numpy())
            probs.append(torch.softmax(logits, dim=1).numpy())
    with h5py.File(opts.out, "w") as file:
        file["class"], file["probs"] = np.concatenate(classes), np.concatenate(probs)
    print(json.dumps({"samples_per_s": len(x) / (time.perf_counter() - began)}), flush=True)


def _hpcdl_worker(opts: argparse.Namespace) -> None:
    """Every variant twice (A B B A) on this job's ranks, end to end through hpcdl.predict; rank 0 prints figures."""
    import hpcdl

    world = hpcdl.init(threads=opts.threads)
    model = _model(opts)
    slowed = _slowed(model) if world.rank == world.size - 1 else model
    hpcdl.predict(model, opts.data, WARMUP_SPLIT, out=opts.out, batch=opts.batch)  # untimed warm-up
    variants = opts.variants.split(",")
    seconds, rows, rows_per_rank = dict.fromkeys(variants, 0.0), 0, {}
    for variant in variants + variants[::-1]:
        schedule, _, slow = variant.partition("-")
        world.barrier()
        began = time.perf_counter()
        scored = hpcdl.predict(
            slowed if slow else model, opts.data, SPLIT, out=opts.out, outputs=("class", "probs"),
            schedule=schedule, batch=opts.batch,
        )  # fmt: skip
        world.barrier()
        seconds[variant] += time.perf_counter() - began
        rows, rows_per_rank[variant] = scored.rows, scored.rows_per_rank
    figures = {v: {"samples_per_s": 2 * rows / seconds[v], "rows_per_rank": rows_per_rank[v]} for v in variants}
    if world.is_root:
        print(json.dumps(figures), flush=True)


def _command(worker: str, ranks: int, variants: tuple[str, ...], data: Path, out: Path, opts) -> list[str]:
    args = [
        "-m", "hpcdl.bench.infer", "--worker", worker, "--data", str(data), "--out", str(out),
        "--variants", ",".join(variants), "--features", str(opts.features), "--hidden", opts.hidden,
        "--classes", str(opts.classes), "--batch", str(opts.batch), "--threads", str(opts.threads),
    ]  # fmt: skip
    return [sys.executable, *args] if worker == "torch" else [*mpiexec(), "-n", str(ranks), sys.executable, *args]


def _job(worker: str, ranks: int, variants: tuple[str, ...], data: Path, folder: Path, opts) -> dict[str, Any]:
    """One launch; its figures keyed `torch` or `hpcdl-<ranks>-<variant>`, and samples_per_s for the round's log."""
    result = run_worker(_command(worker, ranks, variants, data, folder / f"{worker}-{ranks}.h5", opts))
    if worker == "torch":
        return {"torch": result, "samples_per_s": result["samples_per_s"]}
    figures = {f"hpcdl-{ranks}-{variant}": values for variant, values in result.items()}
    return {**figures, "samples_per_s": result[variants[0]]["samples_per_s"]}


def _paired_ratio(runs: list[dict[str, Any]], faster: str, slower: str) -> float:
    """The median over rounds of `faster`'s rate over `slower`'s, both measured in the same job."""
    return median([r[faster]["samples_per_s"] / r[slower]["samples_per_s"] for r in runs if faster in r])


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant, print a table, return (and write) the flat figures."""
    from hpcdl.data.make import make_synthetic

    ranks = opts.ranks
    with tempfile.TemporaryDirectory(prefix="hpcdl-bench-infer-") as tmp:
        folder = Path(tmp)
        data = folder / "data.h5"
        total = round(opts.n / (1 - VAL_FRACTION))
        make_synthetic(data, total, opts.features, opts.classes, val_fraction=VAL_FRACTION, progress=False)
        rows = total - round(total * VAL_FRACTION)
        print(
            f"bench infer: {rows:,} samples x {opts.features} features, MLP {opts.features}-{opts.hidden}-"
            f"{opts.classes}, batch {opts.batch}, {opts.threads} thread(s) per rank; the slowed rank sleeps as long "
            "as each batch took (2x slower)"
        )
        jobs = {
            "torch loop": lambda: _job("torch", 1, ("static",), data, folder, opts),
            "hpcdl 1 rank": lambda: _job("hpcdl", 1, VARIANTS[:2], data, folder, opts),
            f"hpcdl {ranks} ranks": lambda: _job("hpcdl", ranks, VARIANTS, data, folder, opts),
        }
        results = interleaved(jobs, opts.repeats)
    runs = [figures for job in results.values() for figures in job]
    names = ["torch", *(f"hpcdl-1-{v}" for v in VARIANTS[:2]), *(f"hpcdl-{ranks}-{v}" for v in VARIANTS)]
    rates = {name: [r[name]["samples_per_s"] for r in runs if name in r] for name in names}
    rate = {name: median(values) for name, values in rates.items()}
    slowed = f"hpcdl-{ranks}-dynamic-slowed"
    slowed_rows = [r[slowed]["rows_per_rank"] for r in runs if slowed in r]
    flat = provenance(ranks, opts.threads)
    flat.update(rows=rows, features=opts.features, hidden=opts.hidden, batch=opts.batch, repeats=opts.repeats)
    flat.update({f"{name.replace('-', '_')}_samples_per_s": round(rate[name], 1) for name in names})
    flat.update({f"{name.replace('-', '_')}_spread": round(spread(rates[name]), 3) for name in names})
    flat.update(
        dynamic_vs_static_slowed=round(_paired_ratio(runs, slowed, f"hpcdl-{ranks}-static-slowed"), 3),
        dynamic_vs_static_equal=round(_paired_ratio(runs, f"hpcdl-{ranks}-dynamic", f"hpcdl-{ranks}-static"), 3),
        dynamic_slowed_rows_per_rank=slowed_rows[-1],
    )
    labels = {
        "torch": "plain torch loop, 1 process",
        **{f"hpcdl-{n}-{v}": f"hpcdl {v.replace('-slowed', '')}" for n in (1, ranks) for v in VARIANTS},
    }
    rows_of_table = [
        [labels[name], 1 if name == "torch" else name.split("-")[1], "yes" if "slowed" in name else ""]
        + [f"{rate[name]:,.0f}", f"±{100 * spread(rates[name]):.0f}%", f"{rate[name] / rate['torch']:.2f}"]
        for name in names
    ]
    headers = ["engine", "ranks", "last rank slowed 2x", "samples/s (median)", "spread", "vs torch loop"]
    print()
    print(table(headers, rows_of_table))
    print(
        f"dynamic/static with rank {ranks - 1} slowed: {flat['dynamic_vs_static_slowed']:.2f}x (rows per rank "
        f"{'/'.join(map(str, slowed_rows[-1]))}); with equal ranks: {flat['dynamic_vs_static_equal']:.2f}x"
    )
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the orchestrator and its workers."""
    parser.add_argument("--n", type=int, default=200_000, help="samples scored")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden", default="512,512", help="the MLP's hidden widths")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the torch loop)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs every hpcdl variant twice)")
    parser.add_argument("--json", help="write the figures here as one flat JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", choices=["torch", "hpcdl"])
    cli.add_argument("--data")
    cli.add_argument("--out")
    cli.add_argument("--variants", default="static")
    worker_opts = cli.parse_args()
    (_torch_worker if worker_opts.worker == "torch" else _hpcdl_worker)(worker_opts)
