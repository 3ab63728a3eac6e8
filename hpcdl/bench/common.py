"""What every benchmark shares: launching workers, interleaved repeats, medians, provenance."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError


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


def provenance_line(flat: dict[str, Any]) -> str:
    """The line printed under every benchmark's table: what produced the figures."""
    note = " (OVERSUBSCRIBED: not a speed figure)" if flat["oversubscribed"] else ""
    return f"commit {flat['commit']}, torch {flat['torch']}, {flat['mpi']}, {flat['cores']} cores{note}"


def write_json(path: str | None, flat: dict[str, Any]) -> None:
    """Write the figures as one flat JSON object, if asked."""
    if path:
        Path(path).write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
