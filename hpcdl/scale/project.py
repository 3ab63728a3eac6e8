"""`hpcdl scale project`: alpha-beta projections of strong and weak scaling to 1-1,024 nodes.

A message of n bytes costs alpha + n x beta (latency, inverse bandwidth). One step of
global batch B on p nodes (one rank per node) then costs, with c the measured compute
time per sample and o the per-step overhead that does not shrink (optimizer, data):

- ring-Allreduce data parallel: c B / p + o + 2(p-1) alpha + 2(p-1)/p n beta   (n = gradient bytes)
- parameter server (one server, p workers, one link): c B / p + o + 2 p (alpha + n beta)
- pipeline, S = p stages, m micro-batches: (m + S - 1) (c B / (m S) + 2 (alpha + a B/m beta)) + o / S
  (the bubble is the (S - 1) extra slots; a = activation bytes per sample between stages)

Weak scaling keeps the per-node batch: B = b p (and m grows with p in the pipeline).
No overlap of communication with compute is assumed: an upper bound on exposed time.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hpcdl.errors import ConfigError, DataError

NODES = [2**k for k in range(11)]  # 1 .. 1,024
STRATEGIES = ("ring-allreduce DP", "parameter server", "pipeline")


@dataclass(frozen=True)
class Network:
    """Point-to-point alpha (s) and beta (s/byte); the Allreduce pair when it was measured on its own."""

    alpha: float
    beta: float
    ring_alpha: float | None = None
    ring_beta: float | None = None
    # The measured Allreduce curve (sizes, seconds, ranks), to read the bandwidth at the gradients' own size.
    ring_measured: tuple[tuple[float, ...], tuple[float, ...], int] | None = None

    def at_size(self, nbytes: float) -> tuple[Network, str]:
        """This network with the ring beta the measured Allreduce achieved at `nbytes`, and a note saying so.

        A fit over sizes from bytes to megabytes weighs every size alike, yet a step sends one
        size: where the measurements cover it, the time measured there is what a step pays
        (a TCP link under a busy CPU reaches less than its rate). Outside them, the fit stands.
        """
        if self.ring_measured is None or self.ring_alpha is None:
            return self, "ring beta from the fit"
        sizes, seconds, ranks = self.ring_measured
        if not sizes[0] <= nbytes <= sizes[-1] or ranks < 2:
            return self, f"ring beta from the fit ({nbytes / 2**20:.2f} MiB is outside the measured sizes)"
        measured = float(np.exp(np.interp(np.log(nbytes), np.log(sizes), np.log(seconds))))
        beta = (measured - 2 * (ranks - 1) * self.ring_alpha) / (2 * (ranks - 1) / ranks * nbytes)
        if beta <= 0:
            return self, "ring beta from the fit"
        note = f"ring beta at {nbytes / 2**20:.2f} MiB as measured ({1e3 * measured:.2f} ms on {ranks} ranks)"
        return replace(self, ring_beta=beta), note


@dataclass(frozen=True)
class Workload:
    """What one step needs: compute per sample, fixed overhead, gradient and activation bytes, batch."""

    compute_s_per_sample: float
    overhead_s: float
    grad_bytes: float
    global_batch: int
    micro_batches: int = 8
    activation_bytes_per_sample: float = 4096.0


def ring_allreduce_time(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Ring Allreduce of n bytes over p ranks: 2(p-1) alpha + 2(p-1)/p n beta."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta


def parameter_server_time(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """p workers push n bytes of gradients and pull n bytes of parameters through one server link."""
    return 2 * p * (alpha + nbytes * beta) if p > 1 else 0.0


def step_time(strategy: str, p: int, work: Workload, net: Network) -> float:
    """Seconds per step of `strategy` on p nodes (see the module docstring for the formulas)."""
    compute = work.compute_s_per_sample * work.global_batch / p
    if strategy == "ring-allreduce DP":
        alpha, beta = net.ring_alpha or net.alpha, net.ring_beta or net.beta
        return compute + work.overhead_s + ring_allreduce_time(p, work.grad_bytes, alpha, beta)
    if strategy == "parameter server":
        return compute + work.overhead_s + parameter_server_time(p, work.grad_bytes, net.alpha, net.beta)
    m = work.micro_batches
    slots = m + p - 1
    send = 2 * (net.alpha + work.activation_bytes_per_sample * work.global_batch / m * net.beta) if p > 1 else 0.0
    return slots * (compute / m + send) + work.overhead_s / p


def project(work: Workload, net: Network, mode: str, nodes: list[int] = NODES) -> dict[str, list[float]]:
    """Samples/s of each strategy at each node count; weak mode scales the batch (and micro-batches) with p."""
    rates: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for p in nodes:
        scaled = (
            work
            if mode == "strong"
            else replace(work, global_batch=work.global_batch * p, micro_batches=work.micro_batches * p)
        )
        for s in STRATEGIES:
            rates[s].append(scaled.global_batch / step_time(s, p, scaled, net))
    return rates


def fit_alpha_beta(nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (alpha, beta) of t = alpha + n beta, in relative error so small messages count too."""
    n, t = np.asarray(nbytes, dtype=float), np.asarray(seconds, dtype=float)
    design = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return max(float(alpha), 0.0), max(float(beta), 0.0)


def network_from_comm(path: str) -> Network:
    """alpha/beta from `hpcdl bench comm --json`: Send/Recv for point-to-point, Allreduce for the ring."""
    try:
        data = json.loads(Path(path).read_text())
        ops = data["ops"]
        p2p, ring = ops["sendrecv"]["fit"], ops["allreduce"]["fit"]
        curve = (tuple(ops["allreduce"]["bytes"]), tuple(ops["allreduce"]["seconds"]), int(data["ranks"]))
        return Network(p2p["alpha_s"], p2p["beta_s_per_byte"], ring["alpha_s"], ring["beta_s_per_byte"], curve)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"--comm {path}: not a `hpcdl bench comm --json` file ({exc})") from None


def workload_from_study(folder: str, micro_batches: int, activation_bytes: float) -> tuple[Workload, list]:
    """The workload measured at a study's smallest rank count, and the study's rows (for the error)."""
    from hpcdl.scale.report import load_study, summarize

    meta, runs = load_study(folder)
    rows = summarize(meta, runs, folder)
    base = rows[0]
    per_sample = base.split_ms["compute"] / 1000 * base.ranks / _batch(runs, base.ranks)
    overhead = (base.split_ms["data"] + base.split_ms["optimizer"] + base.split_ms["other"]) / 1000
    grad_bytes = max(r.get("comm_bytes_per_step", 0) for r in runs) or 4 * runs[0]["params"]
    work = Workload(per_sample, overhead, grad_bytes, _batch(runs, base.ranks), micro_batches, activation_bytes)
    return work, rows


def _batch(runs: list[dict], ranks: int) -> int:
    return next(r["global_batch"] for r in runs if r["ranks"] == ranks)


def prediction_errors(rows: list, runs_batch: dict[int, int], work: Workload, net: Network) -> list[tuple]:
    """(ranks, measured ms/step, predicted ms/step, relative error) of ring DP at each measured size."""
    out = []
    for row in rows:
        scaled = replace(work, global_batch=runs_batch[row.ranks])
        predicted = 1000 * step_time("ring-allreduce DP", row.ranks, scaled, net)
        out.append((row.ranks, row.step_ms, predicted, (predicted - row.step_ms) / row.step_ms))
    return out


def projection_figure(strong: dict, weak: dict, nodes: list[int], measured: list[tuple[int, float]] | None = None):
    """Two panels: strong-scaling speedup (with ideal) and weak-scaling efficiency, per strategy, log x."""
    from hpcdl.plot import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    left.plot(nodes, nodes, "k--", linewidth=1, label="ideal")
    for s in STRATEGIES:
        left.plot(nodes, [r / strong[s][0] for r in strong[s]], "-", label=s)
        right.plot(nodes, [r / (weak[s][0] * p) for r, p in zip(weak[s], nodes)], "-", label=s)
    if measured:
        left.plot([p for p, _ in measured], [v for _, v in measured], "ko", label="measured")
    left.set(xscale="log", yscale="log", xlabel="nodes", ylabel="speedup", title="Strong scaling (projected)")
    right.set(xscale="log", xlabel="nodes", ylabel="efficiency", title="Weak scaling (projected)", ylim=(0, 1.05))
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_projection(opts: argparse.Namespace) -> dict:
    """Project, print the tables and the error on measured points, write projection.{md,csv,png,json}."""
    from hpcdl.studies import table

    if opts.comm:
        net = network_from_comm(opts.comm)
    elif opts.alpha is not None and opts.beta is not None:
        net = Network(opts.alpha, opts.beta)
    else:
        raise ConfigError("scale project: give --comm comm.json (from `hpcdl bench comm --json`) or --alpha and --beta")
    rows, batches = [], {}
    if opts.study:
        work, rows = workload_from_study(opts.study, opts.micro_batches, opts.activation_bytes)
        from hpcdl.scale.report import load_study

        batches = {r["ranks"]: r["global_batch"] for r in load_study(opts.study)[1]}
    elif opts.compute_ms_per_sample and opts.params and opts.batch:
        work = Workload(
            opts.compute_ms_per_sample / 1000,
            opts.overhead_ms / 1000,
            4.0 * opts.params,
            opts.batch,
            opts.micro_batches,
            opts.activation_bytes,
        )
    else:
        raise ConfigError("scale project: give --study DIR, or --compute-ms-per-sample, --params and --batch")
    if opts.batch < 0 or opts.micro_batches < 1 or opts.max_nodes < 1:
        raise ConfigError("scale project: --batch must be >= 0, --micro-batches and --max-nodes >= 1")
    if opts.batch:
        work = replace(work, global_batch=opts.batch)
    net, ring_note = net.at_size(work.grad_bytes)
    nodes = [p for p in NODES if p <= opts.max_nodes]
    strong, weak = project(work, net, "strong", nodes), project(work, net, "weak", nodes)
    print(
        f"scale project: compute {1e3 * work.compute_s_per_sample:.4f} ms/sample, overhead {1e3 * work.overhead_s:.2f}"
        f" ms/step, gradients {work.grad_bytes / 2**20:.2f} MiB, global batch {work.global_batch}; "
        f"alpha {1e6 * net.alpha:.2f} us, beta {1e9 * net.beta:.4f} ns/B (p2p)"
        + (f", ring alpha {1e6 * net.ring_alpha:.2f} us, beta {1e9 * net.ring_beta:.4f} ns/B" if net.ring_alpha else "")
        + (f" ({ring_note})" if net.ring_alpha else "")
    )
    headers = ["nodes"] + [f"{s} {m}" for m in ("strong", "weak") for s in STRATEGIES]
    body = []
    for i, p in enumerate(nodes):
        cells = [str(p)]
        # Efficiency: strong against p x the 1-node rate; weak against p x the 1-node rate too (batch grows).
        for rates in (strong, weak):
            cells += [f"{rates[s][i]:,.0f} ({rates[s][i] / (rates[s][0] * p):.2f})" for s in STRATEGIES]
        body.append(cells)
    text = table(headers, body)
    print("samples/s (efficiency) per strategy, strong (global batch fixed) and weak (batch per node fixed):")
    print(text)
    errors = prediction_errors(rows, batches, work, net) if rows else []
    for ranks, measured, predicted, err in errors:
        print(f"  measured {ranks} rank(s): {measured:.2f} ms/step, predicted {predicted:.2f}, error {100 * err:+.1f}%")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "projection.md").write_text(text + "\n")
    network = {name: value for name, value in net.__dict__.items() if name != "ring_measured"}
    result = {"nodes": nodes, "strong": strong, "weak": weak, "errors": errors, "network": network}
    (out / "projection.json").write_text(json.dumps(result, indent=2) + "\n")
    measured = [(r.ranks, r.speedup) for r in rows] if rows else None
    fig = projection_figure(strong, weak, nodes, measured)
    fig.savefig(out / "projection.png")
    print(f"wrote {out / 'projection.md'}, {out / 'projection.json'}, {out / 'projection.png'}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hpcdl scale project`."""
    parser.add_argument("--study", help="a results folder: compute per sample, gradient bytes, batch, measured points")
    parser.add_argument("--comm", help="alpha-beta fits from `hpcdl bench comm --json FILE`")
    parser.add_argument("--alpha", type=float, help="your network's latency, seconds (e.g. 2e-6)")
    parser.add_argument("--beta", type=float, help="your network's inverse bandwidth, s/byte (e.g. 1e-10 = 10 GB/s)")
    parser.add_argument("--compute-ms-per-sample", type=float, help="without --study: compute time per sample")
    parser.add_argument("--overhead-ms", type=float, default=0.0, help="without --study: fixed time per step")
    parser.add_argument("--params", type=float, help="without --study: parameters (float32 gradients)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: the study's)")
    parser.add_argument("--micro-batches", type=int, default=8, help="pipeline micro-batches per step")
    parser.add_argument("--activation-bytes", type=float, default=4096.0, help="pipeline bytes per sample per stage")
    parser.add_argument("--max-nodes", type=int, default=1024)
    parser.add_argument("--out", default="runs/projection", help="folder for projection.{md,json,png}")
