"""What the benchmarks and the scaling studies share: the command that launches ranks, what produced a figure,
Markdown tables. Below both, so that neither imports the other."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
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


def provenance(ranks: int, threads: int) -> dict[str, Any]:
    """What produced a figure: commit, versions, ranks, threads, cores, oversubscription."""
    import torch

    from hpcdl.comm import bindings_version, library_version

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    cores = os.cpu_count() or 1
    return {
        "commit": commit or "unknown",
        "torch": torch.__version__,
        "mpi": library_version().strip(),
        "mpi4py": bindings_version(),
        "python": platform.python_version(),
        "cores": cores,
        "ranks": ranks,
        "threads_per_rank": threads,
        "oversubscribed": ranks * threads > cores,
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into README)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
