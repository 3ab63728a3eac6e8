"""Timers for the per-step time split, cross-rank reductions of them, and the JSON-lines log."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdl import trace
from hpcdl.comm import World
from hpcdl.errors import ConfigError

# send/recv: pipeline point-to-point traffic (time spent posting sends and waiting for receives).
PHASES = ("data", "forward", "backward", "send", "recv", "comm", "optimizer")


class PhaseTimer:
    """Accumulates wall time per phase of a step (data, forward, backward, comm, optimizer)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.current: str | None = None  # the phase being timed now (the hang watchdog reads it)
        self.nested: list[float] = []  # per open phase: the time its inner phases took (counted only there)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block under `name`; a phase inside it counts under its own name only."""
        if name == self.current:  # the same phase opened again inside itself is already being timed
            yield
            return
        began, outer = time.perf_counter(), self.current
        self.current = name
        self.nested.append(0.0)
        try:
            yield
        finally:
            self.current = outer
            spent = time.perf_counter() - began
            self.totals[name] += spent - self.nested.pop()
            if self.nested:
                self.nested[-1] += spent
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
        "peak_rss_mb": [round(m, 1) for m in world.allgather(peak)],
    }


def strict_json(record: dict[str, Any], indent: int | None = None) -> str:
    """`record` as strict JSON: each NaN/Inf becomes null, and "nonfinite" maps its key to what it was.

    Python's json writes bare NaN and Infinity, which other readers (jq, JavaScript, many others) refuse.
    """
    nonfinite: dict[str, str] = {}
    clean = _finite_only(record, "", nonfinite)
    if nonfinite:
        clean["nonfinite"] = nonfinite
    return json.dumps(clean, indent=indent, allow_nan=False)


def _finite_only(value: Any, key: str, nonfinite: dict[str, str]) -> Any:
    """`value` with non-finite floats replaced by None, each recorded in `nonfinite` by its dotted key."""
    if isinstance(value, float) and not math.isfinite(value):
        nonfinite[key] = str(value)  # "nan", "inf" or "-inf"
        return None
    if isinstance(value, dict):
        return {
            name: _finite_only(item, f"{key}.{name}" if key else str(name), nonfinite) for name, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_finite_only(item, f"{key}[{index}]", nonfinite) for index, item in enumerate(value)]
    return value


class JsonlLog:
    """Append-only JSON-lines log written by rank 0 (one object per event)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record: Any) -> None:
        """Append one record with a wall-clock timestamp."""
        if self.path is None:
            return
        with self.path.open("a") as out:
            out.write(strict_json({"time": time.time(), **record}) + "\n")


class CsvLog:
    """Epoch records as rows of a CSV file written by rank 0 (the header from the first record; appended on resume)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Append one row; a new file starts with the header."""
        if self.path is None:
            return
        names = list(record)
        fresh = not self.path.exists()
        with self.path.open("a", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore")
            if fresh:
                writer.writeheader()
            writer.writerow(record)


class TensorBoardLog:
    """Records as TensorBoard scalars, written by rank 0 (`run.tensorboard`; the `tensorboard` extra)."""

    def __init__(self, folder: Path | None):
        self.writer, self.folder = None, folder
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: checked at start

            self.writer = SummaryWriter(str(folder))

    def write(self, group: str, record: dict[str, Any], step: int) -> None:
        """Every number of `record` (but its position) as scalar `group/name` at `step`."""
        if self.writer is None:
            return
        try:
            if not self.folder.is_dir():  # checked here: the writer's own thread would end in a traceback
                raise NotADirectoryError(errno.ENOTDIR, "no longer a folder")
            for name, value in record.items():
                if name not in ("step", "epoch") and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{group}/{name}", value, step)
            self.writer.flush()
        except OSError as exc:
            self._stop(exc)

    def _stop(self, exc: OSError) -> None:
        """The event file cannot be written (its folder removed, replaced, full): the run goes on without it, said once;
        TensorBoard is a view of the records, which metrics.jsonl still holds."""
        print(f"hpcdl: warning: TensorBoard events in {self.folder} stopped ({exc.strerror or exc}); "
              "metrics.jsonl and metrics.csv go on", file=sys.stderr, flush=True)  # fmt: skip
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except OSError:
            pass  # the same failure again: said above

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:
                self._stop(exc)


def check_tensorboard() -> None:
    """run.tensorboard needs the tensorboard package: say how to get it before the run starts."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "run.tensorboard = true needs the tensorboard package: pip install 'hpcdl[tensorboard]' (or tensorboard)"
        ) from None


class StepClock:
    """Steps' wall time and samples after the first `warmup` steps, and the phase split of those steps."""

    def __init__(self, warmup: int):
        self.warmup, self.seen = warmup, 0
        self.timer = PhaseTimer()
        self.steps, self.samples, self.seconds = 0, 0, 0.0
        self.mark = time.perf_counter()

    def restart(self) -> None:
        """A step begins after something that is not a step (evaluation, a checkpoint): time from here."""
        self.mark = time.perf_counter()

    def step_done(self, samples: int) -> None:
        """One step ended just now; it counts once the warm-up steps are past."""
        now = time.perf_counter()
        self.seen += 1
        if self.seen > self.warmup:
            self.steps, self.samples, self.seconds = (
                self.steps + 1,
                self.samples + samples,
                self.seconds + now - self.mark,
            )
        else:
            self.timer.reset()
        self.mark = now

    def figures(self, world: World) -> dict[str, Any]:
        """samples/s, ms per step and the per-phase split, over the slowest rank (a step waits for it)."""
        split = slowest_rank_split(world, self.timer, self.steps)
        seconds = float(world.allreduce_max(np.array([self.seconds]))[0])
        return {
            "steps": self.steps,
            "samples_per_s": self.samples / seconds if seconds > 0 else 0.0,
            "step_ms": 1000.0 * seconds / max(1, self.steps),
            "ms_per_step": split,
        }


def run_summary(world: World, clock: StepClock, history: dict[str, Any], elapsed: float, **run: Any) -> dict[str, Any]:
    """A run's summary (the same on every rank): the last epoch's figures, timing, resources and `run`'s
    figures (global_batch, params, comm_bytes_per_step, param_digest, ...); rank 0 prints the time split."""
    figures = clock.figures(world)
    digest = run.pop("param_digest")
    threads = torch.get_num_threads()
    summary = {
        **history,
        "ranks": world.size,
        "threads_per_rank": threads,
        "steps": figures["steps"],
        "timing_skip_steps": run.pop("timing_skip_steps"),
        "global_batch": run.pop("global_batch"),
        "params": run.pop("params"),
        "samples_per_s": figures["samples_per_s"],
        "elapsed_s": elapsed,
        "step_ms": figures["step_ms"],
        "ms_per_step": figures["ms_per_step"],
        **run,
        **resource_figures(world, threads),
        "param_digests": world.allgather(digest),
    }
    split = figures["ms_per_step"]
    world.log(
        f"done: {figures['steps']} steps in {elapsed:.1f} s, {summary['samples_per_s']:,.0f} samples/s; "
        "time per step (ms, slowest rank): " + "  ".join(f"{p} {split[p]:.2f}" for p in PHASES)
    )
    return summary
