"""What every benchmark shares: launching workers, interleaved repeats, medians, provenance."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError


def mpiexec() -> list[str]:
    """The mpiexec beside this Python (the PyPI wheel's), else the one on PATH; Open MPI's flags as below."""
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if not found:
        raise HpcdlError("no mpiexec found: install an MPI (pip install mpich) or load the site's MPI module")
    banner = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    open_mpi = "Open MPI" in banner or "OpenRTE" in banner  # Open MPI 5 says the first, 4.x the second
    # Root (containers, lent machines), more ranks than cores, and --quiet: without it Open MPI follows a rank's
    # one-line error with a dozen lines of its own about the non-zero exit.
    return [found, "--allow-run-as-root", "--oversubscribe", "--quiet"] if open_mpi else [found]


def launcher(kind: str, ranks: int, per_node: int | None = None) -> list[str]:
    """The command that starts `ranks` ranks (`per_node` on each node, if given): mpiexec or, in an allocation, srun.

    srun takes its MPI plugin from SRUN_MPI (default pmi2, as the Slurm templates) and ends the
    whole step when a rank dies (--kill-on-bad-exit), as mpiexec does.
    """
    if kind == "srun":
        command = ["srun", "-n", str(ranks), f"--mpi={os.environ.get('SRUN_MPI', 'pmi2')}", "--kill-on-bad-exit=1"]
        return command + ([f"--ntasks-per-node={per_node}"] if per_node else [])
    command = [*mpiexec(), "-n", str(ranks)]
    if per_node:
        # Open MPI places by a mapping policy; MPICH's hydra (and Intel MPI) take processes per node.
        command += ["--map-by", f"ppr:{per_node}:node"] if "--oversubscribe" in command else ["-ppn", str(per_node)]
    return command


def run_worker(
    command: list[str], timeout: float = 600, env: dict[str, str] | None = None, retries: int = 1
) -> dict[str, Any]:
    """Run one benchmark worker; its last stdout line is a JSON object of results.

    A worker that crashes is run again up to `retries` times, saying so: torchrun/gloo peers
    occasionally abort at start-up on a busy machine, and one bad launch should not void a study.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for attempt in range(retries + 1):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)
        except subprocess.TimeoutExpired:
            raise HpcdlError(f"benchmark worker timed out after {timeout:.0f} s: {' '.join(command)}") from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            return json.loads(lines[-1])
        if attempt < retries:
            print(f"  worker failed ({done.returncode}), running it again: {' '.join(command[-12:])}", flush=True)
    raise HpcdlError(f"benchmark worker failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")


def interleaved(runs: dict[str, Callable[[], dict[str, Any]]], repeats: int, log=print) -> dict[str, list[dict]]:
    """Run every variant once per round (A B A B ...), so machine noise hits all of them alike."""
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for round_ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
            rate = results[name][-1].get("samples_per_s", 0)
            log(f"  round {round_ + 1}/{repeats}  {name:<24} {rate:>10,.0f} samples/s")
    return results


def median(values: list[float]) -> float:
    """Median of repeats (robust to a noisy outlier)."""
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Half the range of the repeats, relative to their median: how noisy the figure was."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / 2 / mid if mid else 0.0


def provenance(ranks: int, threads: int) -> dict[str, Any]:
    """What produced a figure: commit, versions, ranks, threads, cores, oversubscription."""
    import torch
    from mpi4py import MPI

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    cores = os.cpu_count() or 1
    return {
        "commit": commit or "unknown",
        "torch": torch.__version__,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "mpi4py": __import__("mpi4py").__version__,
        "python": platform.python_version(),
        "cores": cores,
        "ranks": ranks,
        "threads_per_rank": threads,
        "oversubscribed": ranks * threads > cores,
    }


def provenance_line(flat: dict[str, Any]) -> str:
    """The line printed under every benchmark's table: what produced the figures."""
    note = " (OVERSUBSCRIBED: not a speed figure)" if flat["oversubscribed"] else ""
    return f"commit {flat['commit']}, torch {flat['torch']}, {flat['mpi']}, {flat['cores']} cores{note}"


def write_json(path: str | None, flat: dict[str, Any]) -> None:
    """Write the figures as one flat JSON object, if asked."""
    if path:
        Path(path).write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into README)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
