"""`hpcdl bench io`: how close the loader comes to what the disk gives, in the manner of DLIO.

For a file (default: generated synthetic sets of `--size-mb`, one per compression
and chunk size), at each rank count, one MPI job times the loader's reads step
by step for every variant: partition `block` / `global` / `chunked`, cached /
streamed / warm (streamed from the page cache). The limit is plain sequential
`pread`s of the same number of bytes of the same file by every rank at once.
Before every streamed and raw run the file's pages are dropped from the page cache
(`posix_fadvise(DONTNEED)`), so both read cold; the output says whether that held.
A step's time is the slowest rank's; figures are mean and spread over steps with
the first and last excluded, and a reduction checks that the ranks read every
sample exactly once. The `chunked` order's randomness is reported beside a uniform
permutation's. Last, one real training run of the synthetic MLP (streamed,
prefetch on) reports its data-wait share.
Run as `python -m hpcdl.bench.io --worker ...` it is the worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpcdl.bench.common import provenance_line, run_worker, write_json
from hpcdl.studies import mpiexec, provenance, table

RAW_BLOCK = 4 << 20  # bytes per plain read of the limit
PARTITIONS, MODES = ("block", "global", "chunked"), ("streamed", "warm", "cached")


def drop_cache(path: str) -> bool:
    """Evict a file's pages from the page cache; True if the kernel accepted it."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) are not dropped until written back
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def warm_cache(path: str) -> None:
    """Read a whole file once, so that its pages are in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(RAW_BLOCK):
            pass


def _stats(step_s: list[float], samples: list[int], row_bytes: int) -> dict[str, float]:
    """Throughput (samples/s, MB/s) over the steps, first and last excluded, and its spread.

    The mean is all samples over all time (a mean of per-step rates would overweight the
    steps served from a span read earlier); the spread is the standard deviation of the
    rate over groups of GROUP_STEPS steps, which each include their span reads.
    """
    # Steps per group for the spread: one `block` shuffle window (imported here: hpcdl.data.partition needs numpy).
    from hpcdl.data.partition import WINDOW_BATCHES as GROUP_STEPS

    kept_s, kept_n = (step_s[1:-1], samples[1:-1]) if len(step_s) > 2 else (step_s, samples)
    rate = sum(kept_n) / max(sum(kept_s), 1e-12)
    groups = [
        sum(kept_n[i : i + GROUP_STEPS]) / max(sum(kept_s[i : i + GROUP_STEPS]), 1e-12)
        for i in range(0, len(kept_s) - GROUP_STEPS + 1, GROUP_STEPS)
    ]
    sd = statistics.stdev(groups) if len(groups) > 1 else 0.0
    return {
        "samples_per_s": round(rate, 1),
        "samples_per_s_sd": round(sd, 1),
        "mb_per_s": round(rate * row_bytes / 1e6, 1),
        "mb_per_s_sd": round(sd * row_bytes / 1e6, 1),
    }


def _time_loader(world, path: str, partition: str, mode: str, batch: int, max_steps: int) -> dict[str, Any]:
    """One variant: every rank iterates its batches (no prefetch: the read itself is timed)."""
    import h5py
    import numpy as np

    from hpcdl.data.chunked import block_rows_of
    from hpcdl.data.loader import Loader, SplitReader
    from hpcdl.data.partition import Partition

    with h5py.File(path, "r") as f:
        n, row_bytes = f["train/x"].shape[0], f["train/x"].dtype.itemsize * math.prod(f["train/x"].shape[1:]) + 8
    block_rows = block_rows_of(path, "train", 0)
    part = Partition(n, batch, world.rank, world.size, seed=0, scheme=partition, block_rows=block_rows)
    if mode == "streamed" and world.is_root:
        drop_cache(path)
    if mode == "warm" and world.is_root:
        warm_cache(path)
    world.barrier()
    began = time.perf_counter()
    reader = SplitReader(
        path, "train", part.owned_range(), math.inf if mode == "cached" else 0, blocks=part.read_blocks()
    )
    fill_s = time.perf_counter() - began
    times, counts, seen = [], [], 0
    world.barrier()
    for step, got in enumerate(Loader(reader, part, prefetch=0).epoch(0)):
        times.append(got.wait_s)
        counts.append(got.global_count)
        seen += len(got.y)
        if max_steps and step + 1 >= max_steps:
            break
    reader.close()
    slowest = world.allreduce_max(np.array(times, dtype=np.float64)).tolist()
    total_seen = sum(world.allgather(seen))
    expected = n if not max_steps else sum(counts)
    return {
        **_stats(slowest, counts, row_bytes),
        "fill_s": round(float(world.allreduce_max(np.array([fill_s]))[0]), 3),
        "steps": len(times),
        "every_sample_once": total_seen == expected,
        "bytes": int(sum(counts) * row_bytes),
    }


def _time_raw(world, path: str, total_bytes: int) -> float:
    """Aggregate MB/s of every rank reading its share of `total_bytes` of the file, sequentially and at once."""
    import numpy as np

    size = os.path.getsize(path)
    share = min(total_bytes, size) // world.size
    start = world.rank * share
    if world.is_root:
        drop_cache(path)
    buffer = bytearray(RAW_BLOCK)
    fd = os.open(path, os.O_RDONLY)
    world.barrier()
    began = time.perf_counter()
    done = 0
    while done < share:
        got = os.preadv(fd, [memoryview(buffer)[: min(RAW_BLOCK, share - done)]], start + done)
        if got == 0:  # end of file
            break
        done += got
    elapsed = float(world.allreduce_max(np.array([time.perf_counter() - began]))[0])
    os.close(fd)
    return round(float(sum(world.allgather(done))) / 1e6 / elapsed, 1)


def _worker(args: argparse.Namespace) -> None:
    """Every variant of every file at this job's rank count; rank 0 prints one JSON line."""
    from hpcdl import comm

    world = comm.init(threads=1)
    out: dict[str, Any] = {}
    for label, path in json.loads(args.files).items():
        for partition in args.partitions.split(","):
            for mode in args.modes.split(","):
                figures = _time_loader(world, path, partition, mode, args.batch, args.max_steps)
                out.update({f"{label}_{partition}_{mode}_{k}": v for k, v in figures.items()})
        loaded = max(v for k, v in out.items() if k.startswith(label) and k.endswith("_bytes"))
        out[f"{label}_raw_mb_per_s"] = _time_raw(world, path, loaded)
    if world.is_root:
        print(json.dumps(out), flush=True)


def _files(opts: argparse.Namespace, folder: Path) -> dict[str, str]:
    """label -> path of every file to measure, generating the synthetic ones that are missing."""
    if opts.file:
        return {"file": opts.file}
    from hpcdl.data import make

    row_bytes = 4 * opts.features
    n = max(2, int(opts.size_mb * 1e6 / row_bytes / 0.9))  # /train holds size_mb; /val 10% more
    found = {}
    for compression in opts.compressions.split(","):
        for chunk_kb in (int(c) for c in opts.chunk_kb.split(",")):
            label = f"{compression}_c{chunk_kb}k"
            path = folder / f"io-{opts.size_mb:g}mb-{opts.features}f-{label}.h5"
            if not path.exists():
                print(f"bench io: generating {path} ({opts.size_mb:g} MB of /train)", flush=True)
                make.make_synthetic(
                    path,
                    n=n,
                    features=opts.features,
                    chunk_rows=max(1, chunk_kb * 1024 // row_bytes),
                    compression=None if compression == "none" else compression,
                    progress=False,
                )
            found[label] = str(path)
    return found


def _train_fraction(opts: argparse.Namespace, path: str, ranks: int, folder: Path) -> dict[str, float]:
    """Data wait as a share of the step, in a real streamed training run with prefetch on."""
    run_dir = folder / "train-run"
    command = [*mpiexec(), "-n", str(ranks), sys.executable, "-m", "hpcdl", "train", "--config", "synthetic-mlp"]
    command += ["--threads", "1"]
    sets = [f"data.path='{path}'", f"run.dir='{run_dir}'", "data.cache_mb=0", f"data.prefetch={opts.prefetch}"]
    sets += [f"train.max_steps={opts.train_steps}", "run.progress=false", f"train.batch_size={opts.batch}"]
    for s in sets:
        command += ["--set", s]
    done = subprocess.run(command, capture_output=True, text=True, timeout=opts.timeout)
    if done.returncode != 0:
        return {"train_data_fraction": float("nan")}
    split = json.loads((run_dir / "summary.json").read_text())["ms_per_step"]
    total = sum(split.values())
    return {
        "train_data_ms_per_step": round(split["data"], 3),
        "train_ms_per_step": round(total, 3),
        "train_data_fraction": round(split["data"] / total, 4) if total else 0.0,
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant at every rank count; print a table, return (and write) the flat figures."""
    rank_counts = [int(r) for r in opts.ranks.split(",")]
    folder = Path(opts.dir or tempfile.mkdtemp(prefix="hpcdl-bench-io-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = _files(opts, folder)
    cold = all(drop_cache(p) for p in files.values())
    flat: dict[str, Any] = provenance(max(rank_counts), 1)
    flat.update(global_batch=opts.batch, cache="cold (posix_fadvise DONTNEED)" if cold else "warm (could not drop)")
    for ranks in rank_counts:
        print(f"bench io: {ranks} rank(s), {len(files)} file(s)", flush=True)
        worker = ["-m", "hpcdl.bench.io", "--worker", "--files", json.dumps(files), "--batch", str(opts.batch)]
        worker += ["--partitions", opts.partitions, "--modes", opts.modes, "--max-steps", str(opts.max_steps)]
        figures = run_worker([*mpiexec(), "-n", str(ranks), sys.executable, *worker], timeout=opts.timeout)
        flat.update({f"r{ranks}_{k}": v for k, v in figures.items()})
    base, top = next(iter(files)), max(rank_counts)
    key = f"r{top}_{base}"
    if f"{key}_block_streamed_mb_per_s" in flat:
        flat["block_vs_raw"] = round(flat[f"{key}_block_streamed_mb_per_s"] / flat[f"{key}_raw_mb_per_s"], 3)
    if f"{key}_global_streamed_samples_per_s" in flat and f"{key}_block_streamed_samples_per_s" in flat:
        ratio = flat[f"{key}_global_streamed_samples_per_s"] / flat[f"{key}_block_streamed_samples_per_s"]
        flat["global_vs_block"] = round(ratio, 3)
    if f"{key}_chunked_streamed_samples_per_s" in flat and f"{key}_block_streamed_samples_per_s" in flat:
        ratio = flat[f"{key}_chunked_streamed_samples_per_s"] / flat[f"{key}_block_streamed_samples_per_s"]
        flat["chunked_vs_block"] = round(ratio, 3)
    if "chunked" in opts.partitions.split(","):
        flat.update(_chunked_randomness(files[base]))
    if opts.train_steps:
        flat.update(_train_fraction(opts, files[base], top, folder))
    _report(flat, files, rank_counts, opts)
    write_json(opts.json, flat)
    return flat


def _chunked_randomness(path: str) -> dict[str, Any]:
    """The chunked order's randomness on this file (epoch 0), beside a uniform permutation's."""
    import h5py
    import numpy as np

    from hpcdl.data.chunked import WINDOW_BLOCKS, block_rows_of, chunked_order, gap_summary

    with h5py.File(path, "r") as f:
        n = f["train/x"].shape[0]
    block_rows = block_rows_of(path, "train", 0)
    order = chunked_order(n, block_rows, WINDOW_BLOCKS, np.random.default_rng([0, 0]))
    figures = {"chunked_block_rows": block_rows, "chunked_window_blocks": WINDOW_BLOCKS}
    return figures | {f"chunked_{k}": v for k, v in gap_summary(order, block_rows).items()}


def _report(flat: dict[str, Any], files: dict[str, str], rank_counts: list[int], opts: argparse.Namespace) -> None:
    rows = []
    for ranks in rank_counts:
        for label in files:
            key = f"r{ranks}_{label}"
            raw = flat[f"{key}_raw_mb_per_s"]
            rows.append([ranks, label, "raw pread (limit)", "", f"{raw:,.0f}", "", "1.00"])
            for partition in opts.partitions.split(","):
                for mode in opts.modes.split(","):
                    v = f"{key}_{partition}_{mode}_"
                    rate, mb = flat[v + "samples_per_s"], flat[v + "mb_per_s"]
                    spread = f"±{100 * flat[v + 'samples_per_s_sd'] / rate:.0f}%" if rate else ""
                    check = "" if flat[v + "every_sample_once"] else " (SAMPLES MISSING)"
                    rows.append(
                        [ranks, label, f"{partition} {mode}{check}", f"{rate:,.0f}", f"{mb:,.0f}", spread,
                         f"{mb / raw:.2f}"]
                    )  # fmt: skip
    print()
    print(table(["ranks", "file", "reader", "samples/s", "MB/s", "spread", "vs raw"], rows))
    lines = [f"page cache: {flat['cache']}; global batch {opts.batch}; steps' first and last excluded"]
    if "block_vs_raw" in flat:
        lines.append(f"block streamed vs raw: {flat['block_vs_raw']:.2f} (aim >= 0.8)")
    if "global_vs_block" in flat:
        lines.append(f"global vs block, streamed: {flat['global_vs_block']:.2f} (aim >= 0.5)")
    if "chunked_vs_block" in flat:
        lines.append(f"chunked vs block, streamed: {flat['chunked_vs_block']:.2f}")
    if "chunked_neighbour_gap" in flat:
        lines.append(
            f"chunked order ({flat['chunked_block_rows']}-row blocks, {flat['chunked_window_blocks']} per window): "
            f"file neighbours {flat['chunked_neighbour_gap']:,.0f} samples apart "
            f"(uniform {flat['chunked_neighbour_gap_uniform']:,.0f}); next sample from the same block "
            f"{100 * flat['chunked_same_block']:.1f}% (uniform {100 * flat['chunked_same_block_uniform']:.1f}%)"
        )
    if "train_data_fraction" in flat:
        lines.append(
            f"training synthetic-mlp streamed, prefetch {opts.prefetch}: data {100 * flat['train_data_fraction']:.1f}% "
            f"of the step (aim < 5%)"
        )
    lines.append(provenance_line(flat))
    print("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The orchestrator's options."""
    parser.add_argument("--file", help="measure this dataset file (default: generated synthetic sets)")
    parser.add_argument("--size-mb", type=float, default=256, help="size of /train of each generated set")
    parser.add_argument("--features", type=int, default=784, help="features per generated sample")
    parser.add_argument("--compressions", default="none,lzf", help="generated sets' compressions (none, lzf, gzip)")
    parser.add_argument("--chunk-kb", default="1024,64", help="generated sets' chunk sizes in KiB (first: the base)")
    parser.add_argument("--dir", help="where generated sets are kept and reused (default: a temporary folder)")
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma-separated")
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--modes", default=",".join(MODES), help="streamed (cold), warm (page cache), cached")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--max-steps", type=int, default=0, help="steps per variant (default: one epoch)")
    parser.add_argument("--train-steps", type=int, default=200, help="steps of the training run (0: skip it)")
    parser.add_argument("--prefetch", type=int, default=4, help="batches read ahead in the training run")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", help="write the figures here as one flat JSON object")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    cli.add_argument("--worker", action="store_true")
    cli.add_argument("--files", required=True)
    cli.add_argument("--batch", type=int, default=256)
    cli.add_argument("--partitions", default=",".join(PARTITIONS))
    cli.add_argument("--modes", default=",".join(MODES))
    cli.add_argument("--max-steps", type=int, default=0)
    _worker(cli.parse_args())
