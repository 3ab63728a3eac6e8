"""Timers for the per-step time split, cross-rank reductions of them, and the JSON-lines log."""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl import trace
from hpcdl.comm import World

# send/recv: pipeline point-to-point traffic (time spent posting sends and waiting for receives).
PHASES = ("data", "forward", "backward", "send", "recv", "comm", "optimizer")


class PhaseTimer:
    """Accumulates wall time per phase of a step (data, forward, backward, comm, optimizer)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.current: str | None = None  # the phase being timed now (the hang watchdog reads it)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block under `name`."""
        began, outer = time.perf_counter(), self.current
        self.current = name
        try:
            yield
        finally:
            self.current = outer
            spent = time.perf_counter() - began
            self.totals[name] += spent
            if trace.ACTIVE is not None:  # every phase shows in the timeline when tracing is on
                trace.ACTIVE.record(name, began, spent)

    def add(self, name: str, seconds: float) -> None:
        """Add time measured elsewhere that ended just now (e.g. the wait for a prefetched batch)."""
        self.totals[name] += seconds
        if trace.ACTIVE is not None and seconds > 0:
            trace.ACTIVE.record(name, time.perf_counter() - seconds, seconds)

    def reset(self) -> None:
        """Forget everything measured so far (after warm-up)."""
        self.totals.clear()

    def vector(self, phases: tuple[str, ...] = PHASES) -> np.ndarray:
        """Totals in `phases` order, as a float64 vector ready for a reduction."""
        return np.array([self.totals.get(p, 0.0) for p in phases], dtype=np.float64)


def slowest_rank_split(world: World, timer: PhaseTimer, steps: int) -> dict[str, float]:
    """Milliseconds per step in each phase, the maximum over ranks (a step waits for the slowest)."""
    worst = world.allreduce_max(timer.vector())
    return {p: 1000.0 * t / max(1, steps) for p, t in zip(PHASES, worst)}


def resource_figures(world: World, threads: int) -> dict[str, Any]:
    """Peak memory of every rank (MiB), nodes, cores, and whether ranks x threads exceed the node's cores."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cores = os.cpu_count() or 1
    return {
        "nodes": world.num_nodes,
        "cores_per_node": cores,
        "oversubscribed": bool(world.allreduce_max(np.array([float(world.local_size * threads > cores)]))[0]),
        "peak_rss_mb": [round(m, 1) for m in world.comm.allgather(peak)],
    }


class JsonlLog:
    """Append-only JSON-lines log written by rank 0 (one object per event)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record: Any) -> None:
        """Append one record with a wall-clock timestamp."""
        if self.path is None:
            return
        with self.path.open("a") as out:
            out.write(json.dumps({"time": time.time(), **record}) + "\n")
