"""`hpcdl bench comm`: latency and bandwidth of MPI operations over message sizes, alpha-beta fits.

Like the OSU micro-benchmarks: Allreduce (float32 SUM), Bcast, Allgather (SIZE bytes from
each rank) and Send/Recv ping-pong between ranks 0 and 1 (one-way time = half the round
trip), each timed over many calls after warm-up, the time being the slowest rank's (best of 3 rounds). Each
operation's times are fitted to t = A + B n, then read as the operation's alpha-beta model:

- Send/Recv: alpha = A, beta = B
- Allreduce (ring): A = 2(p-1) alpha, B = 2(p-1)/p beta
- Allgather (ring): A = (p-1) alpha, B = (p-1) beta
- Bcast: alpha = A, beta = B as measured (the algorithm depends on the size)

`hpcdl scale project --comm FILE` uses these to project scaling to more nodes.
Run as `python -m hpcdl.bench.comm --worker ...` under mpiexec it is the worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from hpcdl.bench.common import provenance_line, run_worker, write_json
from hpcdl.errors import ConfigError
from hpcdl.studies import launcher, provenance, table

OPS = ("allreduce", "bcast", "allgather", "sendrecv")
ROUNDS = 3


def _calls(nbytes: int, most: int) -> int:
    """Calls per size: many for small messages (noise), few for large (time)."""
    return int(min(most, max(10, 2**22 // max(nbytes, 1))))


def _operations(c, MPI, nbytes: int) -> dict[str, Callable[[], None]]:
    """One call of each operation on `nbytes`-byte float32 buffers of their own."""
    # raw MPI: the baseline this benchmark compares against (MPI's own primitives, without hpcdl's layer)
    import numpy as np

    send = np.ones(nbytes // 4, dtype=np.float32)
    recv = np.empty_like(send)
    gathered = np.empty(c.Get_size() * len(send), dtype=np.float32)
    rank = c.Get_rank()

    def sendrecv() -> None:
        if rank == 0:
            c.Send(send, dest=1, tag=5)
            c.Recv(recv, source=1, tag=6)
        elif rank == 1:
            c.Recv(recv, source=0, tag=5)
            c.Send(send, dest=0, tag=6)

    return {
        "allreduce": lambda: c.Allreduce(send, recv, op=MPI.SUM),
        "bcast": lambda: c.Bcast(send, root=0),
        "allgather": lambda: c.Allgather(send, gathered),
        "sendrecv": sendrecv,
    }


def _worker(args: argparse.Namespace) -> None:
    import numpy as np

    from hpcdl import comm

    world = comm.init(threads=1)
    for _ in range(200):  # connections and buffers set up before anything is timed
        world.allreduce_(np.zeros(1, dtype=np.float32))
    sizes = [4 * 4**k for k in range(20) if 4 * 4**k <= args.max_bytes]
    results: dict[str, Any] = {op: {"bytes": sizes, "seconds": []} for op in OPS}
    for nbytes in sizes:
        calls = _operations(world.comm, comm.mpi(), nbytes)
        n = _calls(nbytes, args.max_calls)
        for op in OPS:
            for _ in range(max(5, n // 10)):
                calls[op]()
            # Best of a few rounds of the slowest rank's mean: a shared machine adds noise, never speed.
            best = float("inf")
            for _ in range(ROUNDS):
                world.barrier()
                began = time.perf_counter()
                for _ in range(n):
                    calls[op]()
                elapsed = (time.perf_counter() - began) / n / (2 if op == "sendrecv" else 1)  # one way
                best = min(best, float(world.allreduce_max(np.array([elapsed]))[0]))
            results[op]["seconds"].append(best)
    if world.is_root:
        print(json.dumps({"ranks": world.size, "nodes": world.num_nodes, "ops": results}), flush=True)


def fits(ranks: int, ops: dict[str, Any]) -> dict[str, Any]:
    """Each operation's (A, B) fit and its alpha-beta reading (see the module docstring)."""
    from hpcdl.scale.project import fit_alpha_beta

    p = ranks
    per_op = {
        "sendrecv": (1.0, 1.0),
        "allreduce": (2.0 * (p - 1), 2.0 * (p - 1) / p),
        "allgather": (float(p - 1), float(p - 1)),
        "bcast": (1.0, 1.0),
    }
    out = {}
    for op, data in ops.items():
        a, b = fit_alpha_beta(data["bytes"], data["seconds"])
        predicted = [a + n * b for n in data["bytes"]]
        errors = [abs(m - t) / t for m, t in zip(predicted, data["seconds"])]
        ka, kb = per_op[op]
        data["fit"] = {
            "latency_s": a,
            "s_per_byte": b,
            "alpha_s": a / ka,
            "beta_s_per_byte": b / kb,
            "max_rel_error": max(errors),
        }
        out[op] = data
    return out


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Measure every operation at every size, print OSU-style tables and the fits, return (and write) them."""
    if opts.ranks < 2:
        raise ConfigError("bench comm: --ranks must be >= 2 (Send/Recv needs a partner)")
    if opts.max_bytes < 4 or opts.max_calls < 1 or (opts.per_node is not None and opts.per_node < 1):
        raise ConfigError("bench comm: --max-bytes must be >= 4, --max-calls and --per-node >= 1")
    ranks = launcher(opts.launcher, opts.ranks, opts.per_node)
    command = [*ranks, sys.executable, "-m", "hpcdl.bench.comm", "--worker"]
    sizes = ["--max-bytes", str(opts.max_bytes), "--max-calls", str(opts.max_calls)]
    result = run_worker(command + sizes, timeout=opts.timeout)
    ops = fits(opts.ranks, result["ops"])
    sizes = ops["allreduce"]["bytes"]
    rows = []
    for i, n in enumerate(sizes):
        cells = [f"{n:,}"]
        for op in OPS:
            t = ops[op]["seconds"][i]
            cells.append(f"{1e6 * t:,.1f} us, {n / t / 1e6:,.1f} MB/s")
        rows.append(cells)
    nodes = result.get("nodes", 1)
    print(f"bench comm: {opts.ranks} ranks on {nodes} node(s), time per call (slowest rank) and bytes / time")
    print(table(["bytes", *OPS], rows))
    fit_rows = [
        [
            op,
            f"{1e6 * f['latency_s']:.2f}",
            f"{1 / f['s_per_byte'] / 1e6:,.1f}" if f["s_per_byte"] else "inf",
            f"{1e6 * f['alpha_s']:.2f}",
            f"{1e9 * f['beta_s_per_byte']:.4f}",
            f"{100 * f['max_rel_error']:.0f}%",
        ]
        for op, f in ((op, ops[op]["fit"]) for op in OPS)
    ]
    print(table(["op", "A: latency (us)", "1/B (MB/s)", "alpha (us)", "beta (ns/B)", "max fit error"], fit_rows))
    flat: dict[str, Any] = {**provenance(opts.ranks, 1), "nodes": nodes, "ops": ops}
    print(provenance_line(flat))
    write_json(opts.json, flat)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the orchestrator and its workers."""
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-bytes", type=int, default=4 * 2**20, help="largest message (sizes 4 B x 4^k up to it)")
    parser.add_argument("--max-calls", type=int, default=1000, help="timed calls per size and round (small messages)")
    parser.add_argument(
        "--launcher", choices=["mpiexec", "srun"], default="mpiexec", help="srun inside a Slurm allocation"
    )
    parser.add_argument("--per-node", type=int, help="ranks per node: 1 measures the network between nodes")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="write the measurements and fits here (input of `hpcdl scale project`)")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    add_arguments(cli)
    cli.add_argument("--worker", action="store_true")
    _worker(cli.parse_args())
