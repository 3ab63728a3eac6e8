"""`hpcdl bench zero`: data parallel vs ZeRO-1 vs ZeRO-2 (hpcdl) vs torch's ZeroRedundancyOptimizer with DDP (gloo).

Every variant trains the same MLP with Adam on the same synthetic data, global batch and ranks, as its own job,
interleaved over `--repeats` rounds; samples/s is the median (the first `--warmup` steps left out).

- hpcdl: `hpcdl train` jobs under mpiexec. samples/s, and ZeRO's bytes per rank, from summary.json. Data
  parallel's summary holds no optimizer bytes: every rank holds the whole state, which its final checkpoint
  holds as saved, so its bytes are counted there (and its gradients are as many bytes as its parameters).
- the peer: a torchrun job (as `hpcdl bench dp` launches DDP): DDP sums the gradients during backward,
  ZeroRedundancyOptimizer steps each rank's parameters (whole tensors, spread greedily by size) and broadcasts
  them. Its optimizer bytes are its local optimizer's state after the timed steps.
- Optimizer state bytes count per-element tensors (Adam's moments), not Adam's scalar steps, as hpcdl's ZeRO does.
- Peak RSS per rank is taken at the end of the run, after a final checkpoint in every variant (the peer
  consolidates its optimizer state on rank 0 and saves, as hpcdl does), so rank 0 includes the gathering.
- projection to 8..1,024 ranks of params + grads + optimizer state per rank, from the measured bytes: data
  parallel holds everything at any size; ZeRO-1 its optimizer state / N; ZeRO-2 also the summed gradient
  slice / N (backward still writes the whole local gradient, which it keeps).

Run as `python -m hpcdl.bench.zero --worker ...` it is the peer's worker.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import count
from pathlib import Path
from typing import Any

from hpcdl.bench.common import interleaved, median, provenance_line, run_worker, spread, write_json
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.studies import launcher, provenance, table

HPCDL_VARIANTS = {
    "data": ["parallel.mode='data'"],
    "zero-1": ["parallel.mode='zero'", "parallel.zero_stage=1"],
    "zero-2": ["parallel.mode='zero'", "parallel.zero_stage=2"],
}
PEER = "zero-redundancy"
VARIANTS = (*HPCDL_VARIANTS, PEER)
LR = 1e-3
PROJECTED_RANKS = tuple(2**k for k in range(3, 11))
MIB = 2**20


def state_bytes(state: dict) -> int:
    """Bytes of an optimizer state's per-element tensors (its `state` part: parameter -> {name: value})."""
    return sum(v.numel() * v.element_size() for entry in state.values() for v in entry.values() if _per_element(v))


def _per_element(value: Any) -> bool:
    import torch

    return torch.is_tensor(value) and value.dim() > 0


def _peer(args: argparse.Namespace) -> None:
    """The peer on every rank of a torchrun job: DDP + ZeroRedundancyOptimizer(Adam); rank 0 prints its figures."""
    import resource

    import h5py
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from hpcdl import models
    from hpcdl.bench.dp import _ddp_max
    from hpcdl.config import ModelConfig
    from hpcdl.data.schema import validate

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    info = validate(args.data)
    with h5py.File(args.data) as f:
        x, y = torch.from_numpy(f["train/x"][:]), torch.from_numpy(f["train/y"][:])
    model = models.build(ModelConfig(hidden=args.hidden), info.feature_shape, info.num_classes, seed=0)
    net = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.Adam, lr=LR)
    batches = count()

    def step() -> None:
        first = next(batches) * args.batch % (len(y) - args.batch + 1)  # consecutive global batches, wrapping
        rows = slice(first + rank * args.batch // size, first + (rank + 1) * args.batch // size)
        optimizer.zero_grad()
        F.cross_entropy(net(x[rows]), y[rows]).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = _ddp_max(time.perf_counter() - began)
    held = state_bytes(optimizer.optim.state)
    optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": net.module.state_dict(), "optimizer": optimizer.state_dict()}, args.checkpoint)
    per_rank = [None] * size
    dist.all_gather_object(per_rank, (held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    if rank == 0:
        result = {
            "samples_per_s": args.batch * args.steps / elapsed,
            "optimizer_state_bytes": [h for h, _ in per_rank],
            "peak_rss_bytes": [p for _, p in per_rank],
        }
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


def _peer_command(opts: argparse.Namespace, data: Path, checkpoint: Path) -> list[str]:
    worker = ["-m", "hpcdl.bench.zero", "--worker", "--data", str(data), "--checkpoint", str(checkpoint)]
    worker += ["--hidden", ",".join(map(str, opts.hidden)), "--batch", str(opts.batch), "--steps", str(opts.steps)]
    worker += ["--warmup", str(opts.warmup), "--threads", str(opts.threads)]
    # Launched the way DDP's users launch it: torchrun, one process per rank.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={opts.ranks}", *worker]


def _train(name: str, opts: argparse.Namespace, data: Path, run_dir: Path) -> dict[str, Any]:
    """One `hpcdl train` job of an hpcdl variant: samples/s and per-rank bytes; its run folder removed after."""
    sets = [
        *HPCDL_VARIANTS[name],
        f"data.path='{data}'",
        f"run.dir='{run_dir}'",
        f"model.hidden={opts.hidden}",
        "train.optimizer='adam'",
        f"train.lr={LR}",
        f"train.batch_size={opts.batch}",
        f"train.max_steps={opts.warmup + opts.steps}",
        "train.epochs=1000",  # max_steps ends the run
        f"run.timing_skip_steps={opts.warmup}",
        "run.progress=false",
        "run.keep=1",
    ]
    command = [*launcher("mpiexec", opts.ranks), sys.executable, "-m", "hpcdl", "train", "--config", "synthetic-mlp"]
    command += ["--threads", str(opts.threads), "--overwrite", *(a for s in sets for a in ("--set", s))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        raise HpcdlError(f"bench zero: {name} timed out after {opts.timeout:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        tail = next((line for line in lines if line.startswith("hpcdl: error")), lines[-1])
        raise HpcdlError(f"bench zero: {name} failed (exit {done.returncode}): {tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = {"samples_per_s": summary["samples_per_s"], **_held(summary, run_dir)}
    shutil.rmtree(run_dir)  # its checkpoint and weights are the size of the model three times over
    return figures


def _held(summary: dict[str, Any], run_dir: Path) -> dict[str, list[int]]:
    """Per rank: bytes of parameters, gradients, optimizer state, and peak RSS (module doc)."""
    keys = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_rss_bytes")
    if "zero" in summary:
        return {key: [rank[key] for rank in summary["zero"]["per_rank"]] for key in keys}
    from hpcdl import checkpoint

    saved = checkpoint.load(checkpoint.resolve("latest", run_dir))
    params = sum(t.numel() * t.element_size() for t in saved["model"].values())
    ranks = summary["ranks"]
    return {
        "param_bytes": [params] * ranks,
        "grad_bytes": [params] * ranks,
        "optimizer_state_bytes": [state_bytes(saved["optimizer"]["state"])] * ranks,
        "peak_rss_bytes": [round(mb * MIB) for mb in summary["peak_rss_mb"]],
    }


def _dataset(opts: argparse.Namespace, folder: Path) -> Path:
    """Synthetic data whose train split holds every timed step's rows once (no epoch ends inside the timing)."""
    from hpcdl.data.make import make_synthetic

    path = folder / "synthetic.h5"
    rows = opts.batch * (opts.warmup + opts.steps + 1)  # one batch more for /val
    make_synthetic(path, rows, opts.features, val_fraction=opts.batch / rows, progress=False)
    return path


def _figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median samples/s and spread over the repeats; per rank, each byte count's median over them."""
    rates = [r["samples_per_s"] for r in runs]
    out: dict[str, Any] = {"samples_per_s": round(median(rates), 1), "spread": round(spread(rates), 3)}
    for key in runs[0]:
        if key != "samples_per_s":
            out[key] = [round(median(list(values))) for values in zip(*(r[key] for r in runs))]
    return out


def project(variants: dict[str, dict[str, Any]]) -> list[dict[str, int]]:
    """Params + grads + optimizer state per rank (bytes) of data parallel, ZeRO-1 and ZeRO-2 at 8..1,024 ranks."""
    data, one, two = variants["data"], variants["zero-1"], variants["zero-2"]
    replicated = data["param_bytes"][0] + data["grad_bytes"][0] + data["optimizer_state_bytes"][0]
    # What ZeRO splits, whole: the sum of the measured ranks' slices, cut in n at n ranks.
    state_1, state_2 = sum(one["optimizer_state_bytes"]), sum(two["optimizer_state_bytes"])
    summed_grads = sum(g - p for g, p in zip(two["grad_bytes"], two["param_bytes"]))  # stage 2's summed slices
    local_1 = one["param_bytes"][0] + one["grad_bytes"][0]
    local_2 = 2 * two["param_bytes"][0]  # the flat parameters and the whole local gradient, as big
    return [
        {
            "ranks": n,
            "data_bytes": replicated,
            "zero_1_bytes": round(local_1 + state_1 / n),
            "zero_2_bytes": round(local_2 + (summed_grads + state_2) / n),
        }
        for n in PROJECTED_RANKS
    ]


def _key(name: str) -> str:
    return name.replace("-", "_")


def _measure(opts: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Interleaved repeats of every variant in a temporary folder; the figures per variant."""
    with tempfile.TemporaryDirectory(prefix="hpcdl-bench-zero-") as tmp:
        folder = Path(tmp)
        data = _dataset(opts, folder)
        repeat = {name: count() for name in HPCDL_VARIANTS}
        jobs = {
            name: (lambda name=name: _train(name, opts, data, folder / f"{name}-rep{next(repeat[name])}"))
            for name in HPCDL_VARIANTS
        }
        peer = _peer_command(opts, data, folder / "peer.pt")
        jobs[PEER] = lambda: run_worker(peer, timeout=opts.timeout)
        results = interleaved(jobs, opts.repeats)
    return {name: _figures(results[name]) for name in VARIANTS}


def _mib(per_rank: list[int]) -> str:
    return " / ".join(f"{b / MIB:,.1f}" for b in per_rank)


def _print_tables(flat: dict[str, Any]) -> None:
    peer = flat[f"{_key(PEER)}_samples_per_s"]
    rows = []
    for name in VARIANTS:
        k = _key(name)
        rate = flat[f"{k}_samples_per_s"]
        rows.append(
            [name, f"{rate:,.1f}", f"±{100 * flat[f'{k}_spread']:.0f}%", f"{rate / peer:.2f}"]
            + [_mib(flat[f"{k}_optimizer_state_bytes"]), _mib(flat[f"{k}_peak_rss_bytes"])]
        )
    headers = ["variant", "samples/s (median)", "spread", "vs zero-redundancy", "optimizer MiB/rank"]
    headers.append("peak RSS MiB/rank")
    print()
    print(table(headers, rows))
    print(
        f"optimizer_state_fraction (ZeRO-2 / data parallel, per rank): {flat['optimizer_state_fraction']:.3f}; "
        f"ratio_vs_zero_redundancy (ZeRO-2 / ZeroRedundancyOptimizer samples/s): {flat['ratio_vs_zero_redundancy']:.2f}"
    )
    print("projection: params + grads + optimizer state per rank, MiB")
    body = [
        [f"{r['ranks']:,}"] + [f"{r[c] / MIB:,.1f}" for c in ("data_bytes", "zero_1_bytes", "zero_2_bytes")]
        for r in flat["projection"]
    ]
    print(table(["ranks", "data", "zero-1", "zero-2"], body))


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Train every variant, print the tables, return (and write) the flat figures."""
    if min(opts.ranks, opts.steps, opts.repeats, opts.threads, opts.batch) < 1 or opts.warmup < 0:
        raise ConfigError("bench zero: --ranks, --steps, --repeats, --threads and --batch must be >= 1, --warmup >= 0")
    if opts.batch % opts.ranks:
        raise ConfigError(f"bench zero: --batch {opts.batch} must divide by --ranks {opts.ranks}")
    widths = [opts.features, *opts.hidden, 10]
    params = sum(a * b + b for a, b in zip(widths, widths[1:]))
    print(
        f"bench zero: MLP {'-'.join(map(str, widths))} ({params / 1e6:.1f} M parameters), Adam, global batch "
        f"{opts.batch}, {opts.steps} timed steps, {opts.ranks} ranks x {opts.threads} thread(s)"
    )
    variants = _measure(opts)
    flat: dict[str, Any] = provenance(opts.ranks, opts.threads)
    flat.update(
        features=opts.features, hidden=opts.hidden, params=params, global_batch=opts.batch, steps=opts.steps,
        warmup=opts.warmup, repeats=opts.repeats,
    )  # fmt: skip
    for name, figures in variants.items():
        flat.update({f"{_key(name)}_{key}": value for key, value in figures.items()})
    state = {name: max(variants[name]["optimizer_state_bytes"]) for name in ("data", "zero-2")}
    flat["optimizer_state_fraction"] = round(state["zero-2"] / state["data"], 4)
    rate = variants["zero-2"]["samples_per_s"] / variants[PEER]["samples_per_s"]
    flat["ratio_vs_zero_redundancy"] = round(rate, 3)
    flat["projection"] = project(variants)
    _print_tables(flat)
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def _widths(text: str) -> list[int]:
    return [int(width) for width in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the orchestrator and the peer's worker."""
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--features", type=int, default=1024, help="features of the synthetic data")
    parser.add_argument("--hidden", type=_widths, default="4096,4096,1024", help="the MLP's hidden widths, a,b,...")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per job")
    parser.add_argument("--json", help="write the figures here as one flat JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", action="store_true")
    cli.add_argument("--data")
    cli.add_argument("--checkpoint")
    _peer(cli.parse_args())
