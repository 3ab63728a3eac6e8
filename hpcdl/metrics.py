"""Timers for the per-step time split, cross-rank reductions of them, and the JSON-lines log."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl.comm import World

PHASES = ("data", "forward", "backward", "comm", "optimizer")


class PhaseTimer:
    """Accumulates wall time per phase of a step (data, forward, backward, comm, optimizer)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block under `name`."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - began

    def add(self, name: str, seconds: float) -> None:
        """Add time measured elsewhere (e.g. the wait for a prefetched batch)."""
        self.totals[name] += seconds

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
