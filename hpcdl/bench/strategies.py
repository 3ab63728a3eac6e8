"""`hpcdl bench strategies`: data parallel, parameter servers (sync, async) and local SGD, side by side.

Every strategy trains the same config (`--config`, default digits-mlp) on the same data, ranks, global batch
and epochs, as its own `hpcdl train` job; jobs are interleaved over `--repeats` rounds and figures are medians.
With `--ranks` N and `--servers` S, data parallel and local SGD compute on all N ranks; the parameter servers
take S of them, leaving W = N - S workers (the global batch must divide by N and by W: 96 does for 3 and 2).

- samples/s: the run's summary.json (the first `--warmup` steps left out). Data parallel runs without overlap
  (`parallel.overlap=false`) so that its phases split compute from communication, as the others' do.
- bytes per sample: the algorithms' wire bytes, computed from the parameter bytes G (params x dtype size),
  summed over all ranks per step, over the global batch B: ring Allreduce (data parallel) 2(N-1)/N G from each
  of N ranks; parameter servers W x G of gradients up and W x G of parameters down (ps-async: each push made
  again on fresh parameters adds its gradient and the reply, 2 G); local SGD every H steps the ring Allreduce
  of what it averages (G, or more with parallel.average_optimizer): 2(N-1)/N G / H per rank.
- time to `--target` val_acc: each epoch record's wall-clock stamp in metrics.jsonl, counted from the start
  of the training loop (the last epoch record's stamp less summary.json's elapsed_s, which ends right after
  it): start-up is left out, validation is in. A median over repeats, a repeat not reaching it counting as
  never; "not reached" when most did not.
- projection (weak scaling, 1..1,024 nodes, one worker per node keeping its measured batch): the measured
  compute per step (its data, forward, backward and optimizer phases, each the slowest rank's) plus the
  communication of hpcdl.scale.project's alpha-beta model: ring Allreduce 2(N-1) alpha + 2(N-1)/N G beta
  (local SGD: divided by H); parameter servers: each server's link carries 2 N G/S bytes per step, the
  bottleneck, 2 N (alpha + G/S beta) (server nodes not counted in N). A strategy stops paying at the first
  node count whose efficiency (samples/s over N x its 1-node rate) falls below 50%: under weak scaling
  samples/s keeps rising, so "no longer rises" would never say stop.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdl.bench.common import interleaved, median, provenance_line, spread, write_json
from hpcdl.errors import ConfigError, DataError, HpcdlError
from hpcdl.studies import launcher, provenance, table

if TYPE_CHECKING:
    from hpcdl.scale.project import Network

DATASETS = ("digits", "mnist")  # built by `hpcdl data make NAME` into a temporary folder
STOPS_PAYING_EFFICIENCY = 0.5
COMPUTE_PHASES = ("data", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class Variant:
    """One strategy of the comparison: its parallel.mode and local SGD's H (1: averages every step)."""

    name: str
    mode: str
    local_steps: int = 1

    @property
    def uses_servers(self) -> bool:
        return self.mode.startswith("ps-")

    def sets(self, servers: int) -> list[str]:
        """The config assignments that select this strategy."""
        sets = [f"parallel.mode='{self.mode}'"]
        if self.uses_servers:
            sets.append(f"parallel.servers={servers}")
        if self.mode == "local-sgd":
            sets.append(f"parallel.local_steps={self.local_steps}")
        if self.mode == "data":
            # Overlapped sums would be timed as backward: the projection needs compute and communication
            # apart (hpcdl bench dp measures what overlap gains).
            sets.append("parallel.overlap=false")
        return sets

    @property
    def slug(self) -> str:
        return self.name.replace(" H=", "-h")


VARIANTS = (
    Variant("data", "data"),
    Variant("ps-sync", "ps-sync"),
    Variant("ps-async", "ps-async"),
    Variant("local-sgd H=4", "local-sgd", 4),
    Variant("local-sgd H=16", "local-sgd", 16),
)


def wire_bytes_per_step(variant: Variant, summary: dict[str, Any], ranks: int, servers: int, grad: float) -> float:
    """Bytes all ranks send per step under `variant`'s algorithm, for `grad` bytes of parameters (module doc)."""
    if variant.uses_servers:
        workers = ranks - servers
        # A too-stale push is made again on fresh parameters: its gradient up and a reply of parameters down.
        again = summary.get("recomputed_pushes", 0) / max(1, summary["step"])
        return 2 * workers * grad + 2 * again * grad
    if variant.mode != "local-sgd":
        return 2 * (ranks - 1) * grad  # N ranks each sending 2(N-1)/N G
    local = summary.get("local_sgd", {})
    # What an average carries: the weights, and the optimizer's state with parallel.average_optimizer.
    payload = local["averaged_bytes"] / local["averages"] if local.get("averages") else grad
    return 2 * (ranks - 1) * payload / variant.local_steps


def epoch_curve(run_dir: Path, elapsed_s: float) -> list[dict[str, float]]:
    """(seconds since the training loop began, epoch, val_acc) of each epoch record in metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r.get("event") == "epoch"]
    if not epochs or "val_acc" not in epochs[-1]:
        raise DataError(f"{run_dir}/metrics.jsonl: no epoch records with val_acc (a classification config?)")
    began = epochs[-1]["time"] - elapsed_s  # elapsed_s ends just after the last epoch record
    return [{"seconds": r["time"] - began, "epoch": r["epoch"], "val_acc": r["val_acc"]} for r in epochs]


def time_to_target(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first epoch record reaching `target` val_acc, or None."""
    return next((point for point in curve if point["val_acc"] >= target), None)


def _train(variant: Variant, opts: argparse.Namespace, data: Path, run_dir: Path) -> dict[str, Any]:
    """One `hpcdl train` job of `variant`; its summary.json and its epoch curve."""
    command = launcher(opts.launcher, opts.ranks, opts.per_node)
    if opts.launcher == "srun":
        command.append(f"--cpus-per-task={opts.threads}")
    command += [sys.executable, "-m", "hpcdl", "train"]
    command += ["--config", opts.config, "--threads", str(opts.threads), "--overwrite"]
    for assignment in _sets(variant, opts, data, run_dir):
        command += ["--set", assignment]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        raise HpcdlError(f"bench strategies: {variant.name} timed out after {opts.timeout:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        tail = next((line for line in lines if line.startswith("hpcdl: error")), lines[-1])
        raise HpcdlError(f"bench strategies: {variant.name} failed (exit {done.returncode}): {tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "curve": epoch_curve(run_dir, summary["elapsed_s"])}


def _sets(variant: Variant, opts: argparse.Namespace, data: Path, run_dir: Path) -> list[str]:
    """Every --set of one job: the user's, then what the comparison fixes (the same for every strategy)."""
    return [
        *opts.set,
        *variant.sets(opts.servers),
        f"data.path='{data}'",
        f"run.dir='{run_dir}'",
        f"train.batch_size={opts.batch}",
        f"train.epochs={opts.epochs}",
        f"run.timing_skip_steps={opts.warmup}",
        "run.progress=false",
        "run.checkpoint_every=0",  # no checkpoint inside the timed epochs
        "run.keep=1",
    ]


def _dataset(opts: argparse.Namespace, folder: Path) -> Path:
    """--data as a file, or a built-in dataset made into `folder`."""
    if opts.data not in DATASETS:
        return Path(opts.data).resolve()
    from hpcdl.data import make

    path = folder / f"{opts.data}.h5"
    getattr(make, f"make_{opts.data}")(path)
    return path


def _check(opts: argparse.Namespace, data: Path, folder: Path) -> int:
    """Every strategy's config and layout checked before any launch; returns the parameters' dtype size."""
    import torch

    from hpcdl import config
    from hpcdl.data.schema import validate
    from hpcdl.models import torch_dtype
    from hpcdl.parallel.layout import Layout

    if min(opts.repeats, opts.epochs, opts.threads, opts.servers) < 1 or opts.warmup < 0:
        raise ConfigError("bench strategies: --repeats, --epochs, --threads and --servers must be >= 1, --warmup >= 0")
    if not 0 < opts.target <= 1:
        raise ConfigError(f"bench strategies: --target {opts.target}: a validation accuracy in (0, 1]")
    info = validate(data)
    for variant in VARIANTS:
        cfg = config.load(opts.config, _sets(variant, opts, data, folder / variant.slug))
        Layout.from_config(cfg, opts.ranks).check_data(info)
    return torch.finfo(torch_dtype(cfg.model.dtype)).bits // 8


def _figures(variant: Variant, runs: list[dict[str, Any]], opts: argparse.Namespace, dtype_bytes: int) -> dict:
    """Medians over one strategy's repeats, its wire bytes and its time to the target."""
    grad = runs[0]["params"] * dtype_bytes
    reached = [time_to_target(r["curve"], opts.target) for r in runs]
    seconds = [p["seconds"] if p else math.inf for p in reached]
    middle = sorted(range(len(runs)), key=lambda i: seconds[i])[len(runs) // 2]  # the median repeat
    wire = median([wire_bytes_per_step(variant, r, opts.ranks, opts.servers, grad) for r in runs])
    compute_ms = median([sum(r["ms_per_step"].get(p, 0.0) for p in COMPUTE_PHASES) for r in runs])
    workers = opts.ranks - (opts.servers if variant.uses_servers else 0)
    time_s = median(seconds)
    return {
        "mode": variant.mode,
        "local_steps": variant.local_steps,
        "compute_ranks": workers,
        "samples_per_s": round(median([r["samples_per_s"] for r in runs]), 1),
        "spread": round(spread([r["samples_per_s"] for r in runs]), 3),
        "step_ms": round(median([r["step_ms"] for r in runs]), 3),
        "compute_ms": round(compute_ms, 3),
        "param_bytes": grad,
        "wire_bytes_per_step": round(wire, 1),
        "bytes_per_sample": round(wire / opts.batch, 2),
        "time_to_target_s": None if math.isinf(time_s) else round(time_s, 3),
        "epochs_to_target": None if math.isinf(time_s) else reached[middle]["epoch"],
        "final_val_acc": round(median([r["curve"][-1]["val_acc"] for r in runs]), 4),
        "curve": runs[middle]["curve"],
    }


def network(opts: argparse.Namespace) -> Network:
    """The projection's alpha-beta network: `--comm` (a `hpcdl bench comm --json` file), else --alpha/--beta."""
    from hpcdl.scale.project import Network, network_from_comm

    return network_from_comm(opts.comm) if opts.comm else Network(opts.alpha, opts.beta)


def _network_note(net: Network, ring_note: str, opts: argparse.Namespace) -> str:
    source = f"network of {opts.comm}" if opts.comm else "assumed network"
    note = f"{source}: alpha {1e6 * net.alpha:.2f} us, beta {1e9 * net.beta:.4f} ns/B"
    if net.ring_alpha is not None:
        note += f", ring alpha {1e6 * net.ring_alpha:.2f} us, beta {1e9 * net.ring_beta:.4f} ns/B ({ring_note})"
    return note


def projected_rate(figures: dict[str, Any], nodes: int, net: Network, servers: int, batch: int) -> float:
    """Samples/s of one strategy on `nodes` workers, each keeping its measured batch and compute (weak scaling)."""
    from hpcdl.scale.project import parameter_server_time, ring_allreduce_time

    grad = figures["param_bytes"]
    if figures["mode"].startswith("ps-"):
        comm = parameter_server_time(nodes, grad / servers, net.alpha, net.beta)
    else:
        alpha, beta = net.ring_alpha or net.alpha, net.ring_beta or net.beta
        comm = ring_allreduce_time(nodes, grad, alpha, beta) / figures["local_steps"]
    per_node = batch / figures["compute_ranks"]
    return nodes * per_node / (figures["compute_ms"] / 1000 + comm)


def projection(strategies: dict[str, dict], net: Network, servers: int, batch: int) -> dict[str, dict[str, Any]]:
    """Per strategy: projected samples/s and efficiency at 1..1,024 nodes, and where it stops paying."""
    from hpcdl.scale.project import NODES

    out = {}
    for name, figures in strategies.items():
        rates = [projected_rate(figures, n, net, servers, batch) for n in NODES]
        efficiency = [rate / (n * rates[0]) for rate, n in zip(rates, NODES)]
        stops = next((n for n, e in zip(NODES, efficiency) if e < STOPS_PAYING_EFFICIENCY), None)
        out[name] = {
            "nodes": NODES,
            "samples_per_s": [round(r, 1) for r in rates],
            "efficiency": [round(e, 3) for e in efficiency],
            "stops_paying_at": stops,
        }
    return out


def plot(strategies: dict[str, dict], target: float, path: Path) -> Path:
    """Validation accuracy against wall time, one line per strategy (its median repeat), the target dashed."""
    from hpcdl.plot import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for name, figures in strategies.items():
        curve = figures["curve"]
        ax.plot([p["seconds"] for p in curve], [p["val_acc"] for p in curve], "o-", markersize=3, label=name)
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set(xlabel="seconds since training began", ylabel="val_acc", title="Validation accuracy over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _measure(opts: argparse.Namespace) -> tuple[dict[str, dict], str]:
    """Interleaved repeats of every strategy in a temporary folder; the figures per strategy and the data's name."""
    with tempfile.TemporaryDirectory(prefix="hpcdl-bench-strategies-") as tmp:
        folder = Path(tmp)
        data = _dataset(opts, folder)
        dtype_bytes = _check(opts, data, folder)
        repeat = {v.name: count() for v in VARIANTS}
        jobs = {
            v.name: (lambda v=v: _train(v, opts, data, folder / f"{v.slug}-rep{next(repeat[v.name])}"))
            for v in VARIANTS
        }
        results = interleaved(jobs, opts.repeats)
    return {v.name: _figures(v, results[v.name], opts, dtype_bytes) for v in VARIANTS}, data.name


def _print_tables(flat: dict[str, Any], opts: argparse.Namespace) -> None:
    strategies, base = flat["strategies"], flat["strategies"]["data"]
    rows = []
    for name, f in strategies.items():
        reached = f["time_to_target_s"]
        rows.append(
            [name, f["compute_ranks"], f"{f['samples_per_s']:,.0f}", f"±{100 * f['spread']:.0f}%"]
            + [f"{f['samples_per_s'] / base['samples_per_s']:.2f}", f"{f['bytes_per_sample']:,.0f}"]
            + [f"{f['bytes_per_sample'] / base['bytes_per_sample']:.2f}"]
            + ([f"{reached:.2f}", f"{f['epochs_to_target']:g}"] if reached is not None else ["not reached", "-"])
            + [f"{f['final_val_acc']:.3f}"]
        )
    headers = ["strategy", "compute ranks", "samples/s (median)", "spread", "vs data", "bytes/sample"]
    headers += ["vs data", f"s to val_acc {opts.target:g}", "epochs", "final val_acc"]
    print()
    print(table(headers, rows))
    projected = flat["projection"]
    print(
        "projection, weak scaling (each node one worker with its measured batch and compute), "
        f"{flat['network']['note']}; samples/s (efficiency):"
    )
    body = [
        [str(n)] + [f"{p['samples_per_s'][i]:,.0f} ({p['efficiency'][i]:.2f})" for p in projected.values()]
        for i, n in enumerate(next(iter(projected.values()))["nodes"])
    ]
    print(table(["nodes", *projected], body))
    stops = [f"{name} at {p['stops_paying_at'] or '> 1024'}" for name, p in projected.items()]
    print(f"stops paying (efficiency < {STOPS_PAYING_EFFICIENCY:.0%}): " + ", ".join(stops))


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Train with every strategy, print the tables, plot, return (and write) the figures."""
    workers = opts.ranks - opts.servers
    print(
        f"bench strategies: {opts.config}, data {opts.data}, global batch {opts.batch}, {opts.epochs} epoch(s), "
        f"{opts.ranks} ranks x {opts.threads} thread(s): data parallel and local SGD compute on all {opts.ranks}, "
        f"the parameter servers on {workers} worker(s) with {opts.servers} server(s)"
    )
    net = network(opts)  # a bad --comm file fails here, before any training
    strategies, data_name = _measure(opts)
    net, ring_note = net.at_size(strategies["data"]["param_bytes"])
    measured = {k: v for k, v in vars(net).items() if k != "ring_measured"}
    flat: dict[str, Any] = provenance(opts.ranks, opts.threads)
    flat.update(
        config=opts.config, data=data_name, global_batch=opts.batch, epochs=opts.epochs, repeats=opts.repeats,
        servers=opts.servers, target=opts.target, strategies=strategies,
        network={"note": _network_note(net, ring_note, opts), **measured},
        projection=projection(strategies, net, opts.servers, opts.batch),
    )  # fmt: skip
    plot_path = Path(opts.plot) if opts.plot else Path(opts.json or "bench-strategies.json").with_suffix(".png")
    flat["plot"] = str(plot(strategies, opts.target, plot_path))
    _print_tables(flat, opts)
    print(f"plot: {plot_path}")
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hpcdl bench strategies`."""
    parser.add_argument("--config", default="digits-mlp", help="a named config or a TOML file (classification)")
    parser.add_argument("--data", default="digits", help="an HDF5 dataset file, or digits / mnist (made for the run)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="for every strategy")
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--servers", type=int, default=1, help="parameter servers (ps-sync, ps-async)")
    parser.add_argument("--batch", type=int, default=96, help="global batch: divisible by the ranks and the workers")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--target", type=float, default=0.95, help="val_acc whose time to reach is reported")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of samples/s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--launcher", choices=["mpiexec", "srun"], default="mpiexec", help="srun inside a Slurm allocation"
    )
    parser.add_argument("--per-node", type=int, help="ranks per node (default: packed)")
    parser.add_argument("--comm", help="the projection's network: alpha-beta fits from `hpcdl bench comm --json FILE`")
    parser.add_argument("--alpha", type=float, default=2e-6, help="without --comm: latency, seconds")
    parser.add_argument("--beta", type=float, default=1e-10, help="without --comm: inverse bandwidth, s/byte")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per training job")
    parser.add_argument("--plot", help="the PNG of val_acc over time (default: beside --json, as .png)")
    parser.add_argument("--json", help="write the figures here as one JSON object")
