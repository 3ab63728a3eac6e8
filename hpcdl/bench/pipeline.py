"""`hpcdl bench pipeline`: hpcdl GPipe and 1F1B vs torch.distributed.pipelining (gloo) vs one process.

The same deep MLP (`--layers` x Linear(width, width) with ReLUs), cut at the same layers,
the same global batch and micro-batches for every engine; variants interleaved A B A B.
hpcdl's workers also report where a step's time goes. A stage's idle fraction is the part
of its step spent neither in forward nor in backward. The least idle stage (the busiest)
waits only for the pipeline to fill and drain, so its idle fraction is the measured bubble,
next to the theory (S-1)/(m+S-1); the lighter stages wait that long plus the difference in
work, reported as imbalance (mean idle = bubble + imbalance). Run as `python -m hpcdl.bench.pipeline --worker ...`
it is a worker.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

from hpcdl.bench.common import interleaved, median, provenance_line, run_worker, spread, write_json
from hpcdl.studies import mpiexec, provenance, table

if TYPE_CHECKING:
    import torch
    from torch import nn

ENGINES = ("hpcdl-gpipe", "hpcdl-1f1b", "torch-gpipe", "torch-1f1b", "single")


def _model(opts: argparse.Namespace, device: str = "cpu") -> nn.Sequential:
    """The deep MLP: `opts.layers` x Linear(width, width), ReLUs between; shapes only on `device="meta"`."""
    from hpcdl.config import ModelConfig
    from hpcdl.models import build

    hidden = [opts.width] * (opts.layers - 1)
    return build(ModelConfig(name="mlp", hidden=hidden), (opts.width,), opts.width, seed=0, device=device)


def _data(opts: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(opts.batch, opts.width, generator=g), torch.randint(0, opts.width, (opts.batch,), generator=g)


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(step, opts: argparse.Namespace) -> float:
    """Seconds for `opts.steps` steps after `opts.warmup` untimed ones."""
    for _ in range(opts.warmup):
        step()
    began = time.perf_counter()
    for _ in range(opts.steps):
        step()
    return time.perf_counter() - began


def _hpcdl_worker(opts: argparse.Namespace) -> dict[str, Any] | None:
    """hpcdl's Pipeline: one stage per MPI rank; the whole batch is one replica's."""
    import torch

    from hpcdl import comm
    from hpcdl.data.loader import Batch
    from hpcdl.metrics import PhaseTimer
    from hpcdl.parallel.pipeline import Pipeline

    world = comm.init(threads=opts.threads)
    pipe = Pipeline(_model(opts, "meta"), world.size, opts.micro, opts.engine.split("-")[1], world)
    optimizer = torch.optim.SGD(pipe.params, lr=0.01)
    x, y = _data(opts)
    batch, timer = Batch(x, y, opts.batch), PhaseTimer()
    in_steps = [0.0]

    def step() -> None:
        began = time.perf_counter()
        pipe.train_step(batch, timer)
        in_steps[0] += time.perf_counter() - began
        optimizer.step()
        pipe.zero_grad()

    for _ in range(opts.warmup):
        step()
    timer.reset()
    in_steps[0] = 0.0
    opts.warmup = 0
    elapsed = _timed(step, opts)
    busy = timer.totals["forward"] + timer.totals["backward"]
    mine = [elapsed, busy, in_steps[0], _peak_rss_mib(), pipe.peak_alive]
    stages = world.gather(mine, root=0)
    if world.rank:
        return None
    return {
        "samples_per_s": opts.batch * opts.steps / max(s[0] for s in stages),
        "idle_per_stage": [1 - s[1] / s[2] for s in stages],
        "peak_rss_mib": [round(s[3], 1) for s in stages],
        "peak_alive": [s[4] for s in stages],
    }


def _torch_worker(opts: argparse.Namespace) -> dict[str, Any] | None:
    """torch.distributed.pipelining with manually built stages (the same cut), gloo, launched by torchrun."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from hpcdl.comm import World
    from hpcdl.parallel.pipeline.stages import stage_starts

    torch.set_num_threads(opts.threads)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    layers = list(_model(opts))
    bounds = [*stage_starts(layers, size, "params", None, World(None, 0, 1, 0, 1, 0, 1)), len(layers)]
    module = nn.Sequential(*layers[bounds[rank] : bounds[rank + 1]])
    x, y = _data(opts)
    example = torch.empty(opts.batch // opts.micro, opts.width)
    stage = PipelineStage(module, rank, size, torch.device("cpu"), input_args=(example,))
    kind = ScheduleGPipe if opts.engine == "torch-gpipe" else Schedule1F1B
    schedule = kind(stage, n_microbatches=opts.micro, loss_fn=lambda out, target: F.cross_entropy(out, target))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x)
        elif rank == size - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()

    elapsed = _timed(step, opts)
    stages = [None] * size
    dist.all_gather_object(stages, [elapsed, _peak_rss_mib()])
    dist.destroy_process_group()
    if rank:
        return None
    return {
        "samples_per_s": opts.batch * opts.steps / max(s[0] for s in stages),
        "peak_rss_mib": [round(s[1], 1) for s in stages],
    }


def _single_worker(opts: argparse.Namespace) -> dict[str, Any]:
    """The unsplit model in one process, one step on the whole batch."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(opts.threads)
    model = _model(opts)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data(opts)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    elapsed = _timed(step, opts)
    return {"samples_per_s": opts.batch * opts.steps / elapsed, "peak_rss_mib": [round(_peak_rss_mib(), 1)]}


def _idle_split(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of the bubble (the least idle stage's idle share), the imbalance, and each stage's idle."""
    import numpy as np

    idle = np.array([r["idle_per_stage"] for r in runs])
    return {
        "bubble": round(median(list(idle.min(axis=1))), 4),
        "imbalance": round(median(list(idle.mean(axis=1) - idle.min(axis=1))), 4),
        "idle_per_stage": [round(median(list(column)), 4) for column in idle.T],
    }


def _worker(opts: argparse.Namespace) -> None:
    run = {"hpcdl": _hpcdl_worker, "torch": _torch_worker, "single": _single_worker}[opts.engine.split("-")[0]]
    result = run(opts)
    if result is not None:
        print(json.dumps(result), flush=True)


def _command(engine: str, opts: argparse.Namespace) -> list[str]:
    worker = [
        "-m", "hpcdl.bench.pipeline", "--worker", "--engine", engine, "--threads", str(opts.threads),
        "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--layers", str(opts.layers),
        "--width", str(opts.width), "--batch", str(opts.batch), "--micro", str(opts.micro),
    ]  # fmt: skip
    if engine == "single":
        return [sys.executable, *worker]
    if engine.startswith("torch"):
        # Launched as torch's users launch it: torchrun, one process per stage.
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={opts.stages}",
            *worker,
        ]
    return [*mpiexec(), "-n", str(opts.stages), sys.executable, *worker]


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Benchmark every engine; print a table and the bubble, return (and write) the flat figures."""
    if opts.batch % opts.micro or opts.stages > opts.layers:
        raise SystemExit("bench pipeline: --micro must divide --batch, and --stages be at most --layers")
    print(
        f"bench pipeline: {opts.layers} x Linear({opts.width}, {opts.width}), batch {opts.batch}, "
        f"{opts.micro} micro-batches, {opts.stages} stages x {opts.threads} thread(s)"
    )
    variants = {e: (lambda e=e: run_worker(_command(e, opts))) for e in ENGINES}
    results = interleaved(variants, opts.repeats)
    key = {e: e.replace("-", "_") for e in ENGINES}
    rate = {e: median([r["samples_per_s"] for r in results[e]]) for e in ENGINES}
    theory = (opts.stages - 1) / (opts.micro + opts.stages - 1)
    flat: dict[str, Any] = provenance(opts.stages, opts.threads)
    flat.update(
        layers=opts.layers, width=opts.width, global_batch=opts.batch, micro_batches=opts.micro, stages=opts.stages,
        steps=opts.steps, warmup=opts.warmup, repeats=opts.repeats,
    )  # fmt: skip
    for e in ENGINES:
        flat[f"{key[e]}_samples_per_s"] = round(rate[e], 1)
        flat[f"{key[e]}_spread"] = round(spread([r["samples_per_s"] for r in results[e]]), 3)
        flat[f"{key[e]}_peak_rss_mib_max"] = max(results[e][-1]["peak_rss_mib"])
    limit = opts.stages * rate["single"] * (1 - theory)
    split = {e: _idle_split(results[e]) for e in ("hpcdl-gpipe", "hpcdl-1f1b")}
    gpipe, one_f1b = split["hpcdl-gpipe"], split["hpcdl-1f1b"]
    flat.update(
        ratio_vs_torch_gpipe=round(rate["hpcdl-gpipe"] / rate["torch-gpipe"], 3),
        ratio_vs_torch_1f1b=round(rate["hpcdl-1f1b"] / rate["torch-1f1b"], 3),
        bubble_theory=round(theory, 4),
        bubble_measured=gpipe["bubble"],
        bubble_measured_1f1b=one_f1b["bubble"],
        bubble_vs_theory=round(gpipe["bubble"] / theory, 3),
        bubble_vs_theory_1f1b=round(one_f1b["bubble"] / theory, 3),
        imbalance_gpipe=gpipe["imbalance"],
        imbalance_1f1b=one_f1b["imbalance"],
        idle_per_stage_gpipe=gpipe["idle_per_stage"],
        idle_per_stage_1f1b=one_f1b["idle_per_stage"],
        limit_samples_per_s=round(limit, 1),
        ratio_vs_limit_1f1b=round(rate["hpcdl-1f1b"] / limit, 3),
        hpcdl_gpipe_peak_alive_first_stage=results["hpcdl-gpipe"][-1]["peak_alive"][0],
        hpcdl_1f1b_peak_alive_first_stage=results["hpcdl-1f1b"][-1]["peak_alive"][0],
    )
    rows = []
    for e in ENGINES:
        peer = rate["torch-1f1b" if e.endswith("1f1b") else "torch-gpipe"]
        memory = " / ".join(f"{m:,.0f}" for m in results[e][-1]["peak_rss_mib"])
        bubble = imbalance = idle = "-"
        if e in split:
            bubble, imbalance = f"{100 * split[e]['bubble']:.1f}%", f"{100 * split[e]['imbalance']:.1f}%"
            idle = " / ".join(f"{100 * i:.1f}%" for i in split[e]["idle_per_stage"])
        rows.append(
            [e, f"{rate[e]:,.0f}", f"±{100 * flat[f'{key[e]}_spread']:.0f}%", f"{rate[e] / peer:.2f}", memory,
             bubble, imbalance, idle]
        )  # fmt: skip
    print()
    print(
        table(
            [
                "engine",
                "samples/s (median)",
                "spread",
                "vs torch (same schedule)",
                "peak RSS MiB per stage",
                "bubble",
                "imbalance",
                "idle per stage",
            ],
            rows,
        )  # fmt: skip
    )
    print(
        f"bubble (idle of the least idle stage): measured {100 * flat['bubble_measured']:.1f}% (GPipe, "
        f"{flat['bubble_vs_theory']:.2f}x theory), {100 * flat['bubble_measured_1f1b']:.1f}% (1F1B, "
        f"{flat['bubble_vs_theory_1f1b']:.2f}x), theory (S-1)/(m+S-1) = {100 * theory:.1f}%; the lighter stages "
        f"also wait for the heavier (imbalance). Limit S x single x (1 - bubble) = {limit:,.0f} samples/s, 1F1B at "
        f"{flat['ratio_vs_limit_1f1b']:.2f} of it; activations held on the first stage: "
        f"GPipe {flat['hpcdl_gpipe_peak_alive_first_stage']}, 1F1B {flat['hpcdl_1f1b_peak_alive_first_stage']}"
    )
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the orchestrator and its workers."""
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage (and for the single process)")
    parser.add_argument("--layers", type=int, default=8, help="Linear(width, width) layers")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--micro", type=int, default=8, help="micro-batches per batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here as one flat JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", action="store_true")
    cli.add_argument("--engine", choices=ENGINES)
    _worker(cli.parse_args())
