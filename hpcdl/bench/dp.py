"""`hpcdl bench dp`: hpcdl data parallel (overlap on/off) vs PyTorch DDP (gloo) vs one process.

The orchestrator launches every variant as its own job, interleaved A B A B, with
the same model, global batch, data, ranks and threads; each worker prints one
JSON line of figures. Run as `python -m hpcdl.bench.dp --worker ...` it is a worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from hpcdl.bench.common import (
    interleaved,
    median,
    mpiexec,
    provenance,
    provenance_line,
    run_worker,
    spread,
    table,
    write_json,
)

if TYPE_CHECKING:
    import torch

GLOBAL_BATCH = 256
# name -> (build from the hpcdl.models module, sample shape); the worker imports the models (and torch).
BENCH_MODELS = {
    "mlp": (lambda models: models.MLP(784, [1024, 1024], 10), (784,)),
    "cnn": (lambda models: models.CNN((1, 28, 28), [32, 64], 128, 10), (1, 28, 28)),
}
ENGINES = ("hpcdl", "hpcdl-no-overlap", "ddp", "no-exchange", "single")


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.steps` training steps of one engine; runs on every rank of the job."""
    import torch

    from hpcdl import models

    torch.set_num_threads(args.threads)
    build, shape = BENCH_MODELS[args.model]
    torch.manual_seed(0)
    model = build(models)
    x = torch.randn(GLOBAL_BATCH, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=torch.Generator().manual_seed(2))
    if args.engine == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        net = DistributedDataParallel(model)
        step_fn = _plain_step(net, rank, size, x, y)
        slowest = lambda value: _ddp_max(value)  # noqa: E731
    elif args.engine == "single":
        rank, size = 0, 1
        step_fn = _plain_step(model, 0, 1, x, y)
        slowest = lambda value: value  # noqa: E731
    else:
        from hpcdl import comm
        from hpcdl.data.loader import Batch
        from hpcdl.metrics import PhaseTimer
        from hpcdl.parallel.data import DataParallel

        world = comm.init(threads=args.threads)
        rank, size = world.rank, world.size
        overlap = args.engine != "hpcdl-no-overlap"
        strategy = DataParallel(model, world, args.bucket_mb, overlap=overlap, compression=args.compression)
        optimizer = torch.optim.SGD(strategy.params, lr=0.01)
        share = slice(rank * GLOBAL_BATCH // size, (rank + 1) * GLOBAL_BATCH // size)
        batch = Batch(x[share], y[share], GLOBAL_BATCH)
        timer = PhaseTimer()
        sync = args.engine != "no-exchange"

        def step_fn() -> None:
            strategy.train_step(batch, timer, sync=sync)
            optimizer.step()
            strategy.zero_grad()

        slowest = lambda value: float(world.allreduce_max(torch.tensor([value]).numpy())[0])  # noqa: E731
    for _ in range(args.warmup):
        step_fn()
    if args.engine not in ("ddp", "single"):
        timer.reset()
    began = time.perf_counter()
    for _ in range(args.steps):
        step_fn()
    elapsed = slowest(time.perf_counter() - began)
    result = {"samples_per_s": GLOBAL_BATCH * args.steps / elapsed, "ms_per_step": 1000 * elapsed / args.steps}
    if args.engine not in ("ddp", "single"):
        split = {k: 1000 * slowest(v) / args.steps for k, v in timer.totals.items()}
        result.update(comm_ms=split.get("comm", 0.0), compute_ms=split["forward"] + split["backward"])
    if rank == 0:
        print(json.dumps(result), flush=True)
    return result


def _plain_step(net: torch.nn.Module, rank: int, size: int, x: torch.Tensor, y: torch.Tensor):
    """A textbook step on this rank's share (DDP averages gradients inside backward)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    share = slice(rank * GLOBAL_BATCH // size, (rank + 1) * GLOBAL_BATCH // size)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(net(x[share]), y[share]).backward()
        optimizer.step()

    return step


def _ddp_max(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def _command(engine: str, model: str, ranks: int, opts: argparse.Namespace) -> list[str]:
    worker = [
        "-m",
        "hpcdl.bench.dp",
        "--worker",
        "--engine",
        engine,
        "--model",
        model,
        "--threads",
        str(opts.threads),
        "--steps",
        str(opts.steps),
        "--warmup",
        str(opts.warmup),
        "--bucket-mb",
        str(opts.bucket_mb),
        "--compression",
        opts.compression,
    ]
    if engine == "single":
        return [sys.executable, *worker]
    if engine == "ddp":
        # Launched the way DDP's users launch it: torchrun, one process per rank.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *worker]
    return [*mpiexec(), "-n", str(ranks), sys.executable, *worker]


def _key(engine: str) -> str:
    return engine.replace("-", "_")


def _measure(model: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Interleaved repeats of every engine on one model; the flat figures for it."""
    print(f"bench dp: {model}, global batch {GLOBAL_BATCH}, {opts.ranks} ranks x {opts.threads} thread(s)")
    variants = {e: (lambda e=e, m=model: run_worker(_command(e, m, opts.ranks, opts))) for e in ENGINES}
    results = interleaved(variants, opts.repeats)
    rate = {e: median([r["samples_per_s"] for r in results[e]]) for e in ENGINES}
    exposed = {e: median([r["comm_ms"] for r in results[e]]) for e in ("hpcdl", "hpcdl-no-overlap")}
    hidden = 1 - exposed["hpcdl"] / exposed["hpcdl-no-overlap"] if exposed["hpcdl-no-overlap"] else 0.0
    figures = {f"{model}_{_key(e)}_samples_per_s": round(rate[e], 1) for e in ENGINES}
    figures.update(
        {f"{model}_{_key(e)}_spread": round(spread([r["samples_per_s"] for r in results[e]]), 3) for e in ENGINES}
    )
    figures.update(
        {
            f"ratio_vs_ddp_{model}": round(rate["hpcdl"] / rate["ddp"], 3),
            f"ratio_vs_limit_{model}": round(rate["hpcdl"] / rate["no-exchange"], 3),
            f"efficiency_{model}": round(rate["hpcdl"] / (opts.ranks * rate["single"]), 3),
            f"exposed_comm_ms_{model}": round(exposed["hpcdl"], 3),
            f"exposed_comm_ms_no_overlap_{model}": round(exposed["hpcdl-no-overlap"], 3),
            f"compute_ms_{model}": round(median([r["compute_ms"] for r in results["hpcdl"]]), 3),
            f"comm_hidden_fraction_{model}": round(max(0.0, hidden), 3),
        }
    )
    return figures


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Benchmark every engine on every model; print a table, return (and write) the flat figures."""
    flat: dict[str, Any] = provenance(opts.ranks, opts.threads)
    flat.update(global_batch=GLOBAL_BATCH, steps=opts.steps, warmup=opts.warmup, repeats=opts.repeats)
    models = opts.models.split(",")
    for model in models:
        flat.update(_measure(model, opts))
    rows = []
    for model in models:
        ddp, limit = flat[f"{model}_ddp_samples_per_s"], flat[f"{model}_no_exchange_samples_per_s"]
        for e in ENGINES:
            rate = flat[f"{model}_{_key(e)}_samples_per_s"]
            noise = f"±{100 * flat[f'{model}_{_key(e)}_spread']:.0f}%"
            rows.append([model, e, f"{rate:,.0f}", noise, f"{rate / ddp:.2f}", f"{rate / limit:.2f}"])
    print()
    print(table(["model", "engine", "samples/s (median)", "spread", "vs DDP", "vs no-exchange limit"], rows))
    for m in models:
        print(
            f"{m}: hpcdl/DDP {flat[f'ratio_vs_ddp_{m}']:.2f}x, {flat[f'ratio_vs_limit_{m}']:.2f} of the limit; "
            f"exposed comm {flat[f'exposed_comm_ms_{m}']:.2f} ms/step with overlap, "
            f"{flat[f'exposed_comm_ms_no_overlap_{m}']:.2f} without "
            f"({100 * flat[f'comm_hidden_fraction_{m}']:.0f}% hidden); compute {flat[f'compute_ms_{m}']:.2f} ms/step"
        )
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the orchestrator and its workers."""
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the single process)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument(
        "--compression", choices=["none", "fp16", "bf16"], default="none", help="hpcdl gradients on the wire"
    )
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--json", help="write the figures here as one flat JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", action="store_true")
    cli.add_argument("--engine", choices=ENGINES)
    cli.add_argument("--model", choices=sorted(BENCH_MODELS))
    _worker(cli.parse_args())
