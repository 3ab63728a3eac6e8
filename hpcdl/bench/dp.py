"""`hpcdl bench dp`: hpcdl data parallel (overlap on/off) vs PyTorch DDP vs one process, on CPU or GPU.

On CPU DDP runs on gloo. With `--device cuda` every rank takes the GPU of its node-local rank (ranks
share GPUs when they outnumber them), DDP runs on NCCL when each rank has a GPU of its own (NCCL refuses
two ranks on one GPU) and on gloo otherwise, and hpcdl's gradients reach MPI as `hpcdl.device` decides
(directly with CUDA-aware MPI, else staged through pinned host memory); `hpcdl-staged` forces staging.

The orchestrator launches every variant as its own job, interleaved A B A B, with
the same model, global batch, data, ranks and threads; each worker prints one
JSON line of figures. Run as `python -m hpcdl.bench.dp --worker ...` it is a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from hpcdl.bench.common import interleaved, median, provenance_line, run_worker, spread, write_json
from hpcdl.studies import mpiexec, provenance, table

if TYPE_CHECKING:
    import torch

GLOBAL_BATCH = 256
# name -> (build from the hpcdl.models module, sample shape); the worker imports the models (and torch).
BENCH_MODELS = {
    "mlp": (lambda models: models.MLP(784, [1024, 1024], 10), (784,)),
    "cnn": (lambda models: models.CNN((1, 28, 28), [32, 64], 128, 10), (1, 28, 28)),
}
ENGINES = ("hpcdl", "hpcdl-no-overlap", "ddp", "no-exchange", "single")
GPU_ENGINES = ("hpcdl", "hpcdl-staged", "ddp", "no-exchange", "single")
# The variant whose exposed communication is printed beside hpcdl's, and its JSON key.
BASELINES = {"cpu": "hpcdl-no-overlap", "cuda": "hpcdl-staged"}
BASELINE_KEYS = {"hpcdl-no-overlap": "no_overlap", "hpcdl-staged": "staged"}


def _engines(opts: argparse.Namespace) -> tuple[str, ...]:
    return GPU_ENGINES if opts.device == "cuda" else ENGINES


def _device(local_rank: int, requested: str) -> torch.device:
    """This rank's device: its node-local rank's GPU, or the CPU (one line and exit 2 when no GPU is found)."""
    from hpcdl.device import select_device
    from hpcdl.errors import HpcdlError

    try:
        return select_device(requested, local_rank)
    except HpcdlError as error:
        print(f"hpcdl bench dp: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _ddp_backend(device: torch.device, ranks: int) -> str:
    """NCCL when every rank has a GPU of its own, else gloo (which also sums CUDA tensors)."""
    import torch

    return "nccl" if device.type == "cuda" and ranks <= torch.cuda.device_count() else "gloo"


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.steps` training steps of one engine; runs on every rank of the job."""
    import torch

    from hpcdl import models

    torch.set_num_threads(args.threads)
    build, shape = BENCH_MODELS[args.model]
    torch.manual_seed(0)
    device = _device(int(os.environ.get("LOCAL_RANK", "0")), args.device)
    model = build(models).to(device)
    x = torch.randn(GLOBAL_BATCH, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=torch.Generator().manual_seed(2)).to(device)
    if args.engine == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group(_ddp_backend(device, int(os.environ.get("WORLD_SIZE", "1"))))
        rank, size = dist.get_rank(), dist.get_world_size()
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        step_fn = _plain_step(net, rank, size, x, y)
        slowest = lambda value: _ddp_max(value)  # noqa: E731
    elif args.engine == "single":
        rank, size = 0, 1
        step_fn = _plain_step(model, 0, 1, x, y)
        slowest = lambda value: value  # noqa: E731
    else:
        from hpcdl import comm
        from hpcdl.data.loader import Batch

        if args.engine == "hpcdl-staged":  # gradients through pinned host memory even where MPI is CUDA-aware
            os.environ[comm.CUDA_AWARE_ENV] = "0"
        from hpcdl.metrics import PhaseTimer
        from hpcdl.parallel.data import DataParallelStrategy

        world = comm.init(threads=args.threads)
        rank, size = world.rank, world.size
        if device.type == "cuda" and device.index != world.local_rank % torch.cuda.device_count():
            device = _device(world.local_rank, args.device)  # mpiexec sets no LOCAL_RANK before init
            model, x, y = model.to(device), x.to(device), y.to(device)
        overlap = args.engine != "hpcdl-no-overlap"
        strategy = DataParallelStrategy(model, world, args.bucket_mb, overlap=overlap, compression=args.compression)
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
        mpi_transport = comm.transport(device).name
    for _ in range(args.warmup):
        step_fn()
    _settle(device)
    if args.engine not in ("ddp", "single"):
        timer.reset()
    began = time.perf_counter()
    for _ in range(args.steps):
        step_fn()
    _settle(device)
    elapsed = slowest(time.perf_counter() - began)
    result = {"samples_per_s": GLOBAL_BATCH * args.steps / elapsed, "ms_per_step": 1000 * elapsed / args.steps}
    if args.engine not in ("ddp", "single"):
        split = {k: 1000 * slowest(v) / args.steps for k, v in timer.totals.items()}
        result.update(comm_ms=split.get("comm", 0.0), compute_ms=split["forward"] + split["backward"])
        result.update(mpi_transport=mpi_transport, device=str(device))
    if args.engine == "ddp":
        result["ddp_backend"] = dist.get_backend()
    if rank == 0:
        print(json.dumps(result), flush=True)
    return result


def _settle(device: torch.device) -> None:
    """Wait for the GPU's queued work, so the clock measures it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    t = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")  # NCCL moves GPU memory only
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
        "--device",
        opts.device,
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
    engines = _engines(opts)
    print(
        f"bench dp: {model}, global batch {GLOBAL_BATCH}, {opts.ranks} ranks x {opts.threads} thread(s) "
        f"on {opts.device}"
    )
    variants = {e: (lambda e=e, m=model: run_worker(_command(e, m, opts.ranks, opts))) for e in engines}
    results = interleaved(variants, opts.repeats)
    rate = {e: median([r["samples_per_s"] for r in results[e]]) for e in engines}
    baseline = BASELINES[opts.device]
    exposed = {e: median([r["comm_ms"] for r in results[e]]) for e in ("hpcdl", baseline)}
    figures = {f"{model}_{_key(e)}_samples_per_s": round(rate[e], 1) for e in engines}
    figures.update(
        {f"{model}_{_key(e)}_spread": round(spread([r["samples_per_s"] for r in results[e]]), 3) for e in engines}
    )
    figures[f"{model}_ddp_backend"] = results["ddp"][0].get("ddp_backend", "gloo")
    figures[f"{model}_mpi_transport"] = results["hpcdl"][0]["mpi_transport"]  # host | direct | staged
    figures.update(
        {
            f"ratio_vs_ddp_{model}": round(rate["hpcdl"] / rate["ddp"], 3),
            f"ratio_vs_limit_{model}": round(rate["hpcdl"] / rate["no-exchange"], 3),
            f"efficiency_{model}": round(rate["hpcdl"] / (opts.ranks * rate["single"]), 3),
            f"exposed_comm_ms_{model}": round(exposed["hpcdl"], 3),
            f"exposed_comm_ms_{BASELINE_KEYS[baseline]}_{model}": round(exposed[baseline], 3),
            f"compute_ms_{model}": round(median([r["compute_ms"] for r in results["hpcdl"]]), 3),
        }
    )
    if opts.device == "cpu":  # overlap off is the baseline: how much of the communication overlap hides
        hidden = 1 - exposed["hpcdl"] / exposed[baseline] if exposed[baseline] else 0.0
        figures[f"comm_hidden_fraction_{model}"] = round(max(0.0, hidden), 3)
    return figures


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Benchmark every engine on every model; print a table, return (and write) the flat figures."""
    if opts.device == "cuda":
        from hpcdl.device import no_gpu_message, visible_gpus
        from hpcdl.errors import HpcdlError

        if not visible_gpus():
            raise HpcdlError(no_gpu_message("hpcdl bench dp --device cuda", "--device cpu"))
    flat: dict[str, Any] = provenance(opts.ranks, opts.threads)
    flat.update(global_batch=GLOBAL_BATCH, steps=opts.steps, warmup=opts.warmup, repeats=opts.repeats)
    flat.update(device=opts.device)
    models = opts.models.split(",")
    for model in models:
        flat.update(_measure(model, opts))
    rows = []
    for model in models:
        ddp, limit = flat[f"{model}_ddp_samples_per_s"], flat[f"{model}_no_exchange_samples_per_s"]
        for e in _engines(opts):
            rate = flat[f"{model}_{_key(e)}_samples_per_s"]
            noise = f"±{100 * flat[f'{model}_{_key(e)}_spread']:.0f}%"
            rows.append([model, e, f"{rate:,.0f}", noise, f"{rate / ddp:.2f}", f"{rate / limit:.2f}"])
    print()
    print(table(["model", "engine", "samples/s (median)", "spread", "vs DDP", "vs no-exchange limit"], rows))
    baseline = BASELINES[opts.device]
    for m in models:
        print(
            f"{m}: hpcdl ({flat[f'{m}_mpi_transport']}) / DDP ({flat[f'{m}_ddp_backend']}) "
            f"{flat[f'ratio_vs_ddp_{m}']:.2f}x, {flat[f'ratio_vs_limit_{m}']:.2f} of the limit; "
            f"exposed comm {flat[f'exposed_comm_ms_{m}']:.2f} ms/step, "
            f"{flat[f'exposed_comm_ms_{BASELINE_KEYS[baseline]}_{m}']:.2f} as {baseline}; "
            f"compute {flat[f'compute_ms_{m}']:.2f} ms/step"
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
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank (shared when fewer)"
    )
    parser.add_argument("--json", help="write the figures here as one flat JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", action="store_true")
    cli.add_argument("--engine", choices=sorted(set(ENGINES + GPU_ENGINES)))
    cli.add_argument("--model", choices=sorted(BENCH_MODELS))
    _worker(cli.parse_args())
