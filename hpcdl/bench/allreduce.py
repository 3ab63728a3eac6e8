"""`hpcdl bench allreduce`: one step's bucketed gradient sync vs one Allreduce of one buffer.

The single contiguous Allreduce of the whole gradient's size is the limit for this
MPI on this machine; the figure of merit is bus bandwidth, 2(p-1)/p x bytes / time.
Run as `python -m hpcdl.bench.allreduce --worker ...` under mpiexec it is the worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from hpcdl.bench.common import median, provenance_line, run_worker, write_json
from hpcdl.studies import mpiexec, provenance, table

# A model of about 25 M parameters, in the proportions of a small transformer's layers.
LAYER_SHAPES = [(1024, 1024)] * 12 + [(4096, 1024)] * 3 + [(1024,)] * 24


def _worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from torch import nn

    from hpcdl import comm
    from hpcdl.parallel.grad_sync import GradSync

    world = comm.init(threads=1)
    params = [nn.Parameter(torch.empty(shape)) for shape in LAYER_SHAPES]
    # overlap off: the timed sync starts every bucket itself, as a step's finish() does after backward.
    grads = GradSync(world, params, int(args.bucket_mb * 2**20), args.compression, overlap=False)
    for p in params:
        p.grad.fill_(1.0)
    single = torch.ones(sum(p.numel() for p in params))
    buffer = single.numpy()
    MPI = comm.mpi()

    def bucketed() -> None:
        grads.finish()

    def one_buffer() -> None:
        world.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)  # raw MPI: the baseline this benchmark compares against

    timings: dict[str, list[float]] = {"bucketed": [], "single": []}
    for round_ in range(args.warmup + args.repeats):
        for name, fn in (("bucketed", bucketed), ("single", one_buffer)):
            world.barrier()
            began = time.perf_counter()
            fn()
            elapsed = float(world.allreduce_max(np.array([time.perf_counter() - began]))[0])
            if round_ >= args.warmup:
                timings[name].append(elapsed)
    if world.is_root:
        nbytes = single.numel() * single.element_size()
        print(
            json.dumps(
                {
                    "params": single.numel(),
                    "bytes": nbytes,
                    "buckets": len(grads.buckets),
                    "bucketed_s": median(timings["bucketed"]),
                    "single_s": median(timings["single"]),
                }
            )
        )


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Measure, print a table, return (and write) the flat figures."""
    command = [
        *mpiexec(),
        "-n",
        str(opts.ranks),
        sys.executable,
        "-m",
        "hpcdl.bench.allreduce",
        "--worker",
        "--bucket-mb",
        str(opts.bucket_mb),
        "--repeats",
        str(opts.repeats),
        "--warmup",
        str(opts.warmup),
        "--compression",
        opts.compression,
    ]
    result = run_worker(command)
    factor = 2 * (opts.ranks - 1) / opts.ranks
    bw = {k: factor * result["bytes"] / result[f"{k}_s"] / 1e9 for k in ("bucketed", "single")}
    flat = provenance(opts.ranks, 1)
    flat.update(
        params=result["params"],
        bytes=result["bytes"],
        buckets=result["buckets"],
        bucket_mb=opts.bucket_mb,
        compression=opts.compression,
        bucketed_ms=round(1000 * result["bucketed_s"], 3),
        single_ms=round(1000 * result["single_s"], 3),
        bucketed_bus_gbps=round(bw["bucketed"], 3),
        single_bus_gbps=round(bw["single"], 3),
        sync_bw_fraction=round(bw["bucketed"] / bw["single"], 3),
    )
    print(
        f"bench allreduce: {result['params']:,} float32 gradients ({result['bytes'] / 2**20:.0f} MiB), "
        f"{opts.ranks} ranks, median of {opts.repeats}"
    )
    print(
        table(
            ["sync", "buckets", "time (ms)", "bus bandwidth (GB/s)"],
            [
                ["hpcdl bucketed", result["buckets"], f"{flat['bucketed_ms']:.1f}", f"{bw['bucketed']:.2f}"],
                ["one contiguous Allreduce (limit)", 1, f"{flat['single_ms']:.1f}", f"{bw['single']:.2f}"],
            ],
        )
    )
    print(f"sync_bw_fraction = {flat['sync_bw_fraction']:.3f}")
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the orchestrator and its workers."""
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--compression", choices=["none", "fp16", "bf16"], default="none")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the figures here as one flat JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", action="store_true")
    _worker(cli.parse_args())
