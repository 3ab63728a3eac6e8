"""Timeline tracing: per-rank events, merged on rank 0 into one Chrome trace / Perfetto JSON file.

Tracing is off unless `start()` was called (`hpcdl train --trace FILE`); then every
`PhaseTimer.phase(...)` and each gradient bucket's Allreduce records an event. At the
end `finish(world, path)` estimates each rank's clock offset against rank 0 with a few
ping-pong exchanges, gathers the events on rank 0, shifts them onto rank 0's clock and
writes `{"traceEvents": [{"name", "ph": "X", "ts", "dur", "pid": rank, "tid"}, ...]}`
(microseconds), which chrome://tracing and ui.perfetto.dev open directly.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcdl import outputs
from hpcdl.comm import World
from hpcdl.errors import HpcdlError

# Thread rows of a rank in the viewer: the step's phases, then one row per gradient bucket
# (bucket Allreduces run concurrently with backward and with each other).
MAIN_TID = 0
BUCKET_TID = 1  # bucket k is drawn on row BUCKET_TID + k
PING_PONGS = 8  # exchanges per rank for the clock offset; the one with the shortest round trip wins

# The clock of every event: PhaseTimer and the buckets read time.perf_counter too (a test skews it).
clock = time.perf_counter


@dataclass
class Tracer:
    """Events of this rank: (name, start, duration, row), times in seconds from `clock()`."""

    events: list[tuple[str, float, float, int]] = field(default_factory=list)

    def record(self, name: str, start: float, duration: float, tid: int = MAIN_TID) -> None:
        """Keep one complete event."""
        self.events.append((name, start, duration, tid))


# The active tracer, or None: callers test `trace.ACTIVE is not None`, so tracing off costs one check.
ACTIVE: Tracer | None = None


def start() -> Tracer:
    """Turn tracing on for this process."""
    global ACTIVE
    ACTIVE = Tracer()
    return ACTIVE


def stop() -> Tracer | None:
    """Turn tracing off; returns what was recorded."""
    global ACTIVE
    tracer, ACTIVE = ACTIVE, None
    return tracer


def check_path(path: str | Path, overwrite: bool = False) -> None:
    """Fail early (before training) if the trace file could not be written, or exists (unless `overwrite`)."""
    outputs.check_new_file("--trace", path, overwrite, make_parents=True)


def record(name: str, start_s: float, duration_s: float, tid: int = MAIN_TID) -> None:
    """Record an event if tracing is on."""
    if ACTIVE is not None:
        ACTIVE.record(name, start_s, duration_s, tid)


def clock_offset(world: World, exchanges: int = PING_PONGS) -> float:
    """Seconds to subtract from this rank's clock to get rank 0's (0.0 on rank 0).

    Rank 0 pings each rank in turn; the rank answers with its clock; the offset is the
    rank's clock minus the midpoint of rank 0's send and receive times, from the
    exchange with the shortest round trip (the least disturbed by scheduling).
    """
    offset = 0.0
    for peer in range(1, world.size):
        if world.rank == 0:
            best = (float("inf"), 0.0)
            for _ in range(exchanges):
                sent = clock()
                world.send(None, dest=peer, tag=77)
                theirs = world.recv(peer, tag=78)
                back = clock()
                best = min(best, (back - sent, theirs - (sent + back) / 2))
            world.send(best[1], dest=peer, tag=79)
        elif world.rank == peer:
            for _ in range(exchanges):
                world.recv(0, tag=77)
                world.send(clock(), dest=0, tag=78)
            offset = world.recv(0, tag=79)
    return offset


def chrome_events(per_rank: list[tuple[list, float, str]], origin: float) -> list[dict[str, Any]]:
    """Chrome trace events from each rank's (events, clock offset, host), times relative to `origin`."""
    out: list[dict[str, Any]] = []
    for rank, (events, offset, host) in enumerate(per_rank):
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank} ({host})"}})
        rows = sorted({tid for *_, tid in events} | {MAIN_TID})
        for tid in rows:
            label = "step" if tid == MAIN_TID else f"allreduce bucket {tid - BUCKET_TID}"
            out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": label}})
        for name, began, duration, tid in events:
            out.append(
                {
                    "name": name,
                    "ph": "X",
                    "ts": round((began - offset - origin) * 1e6, 3),
                    "dur": round(duration * 1e6, 3),
                    "pid": rank,
                    "tid": tid,
                }
            )
    return out


def finish(world: World, path: str | Path) -> int:
    """Stop tracing, merge every rank's events on rank 0 and write the trace; returns the event count."""
    tracer = stop() or Tracer()
    offset = clock_offset(world)
    gathered = world.gather((tracer.events, offset, os.uname().nodename), root=0)
    if not world.is_root:
        return 0
    starts = [began - off for events, off, _ in gathered for _, began, _, _ in events]
    events = chrome_events(gathered, min(starts, default=0.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        tmp.replace(path)  # a reader never sees half a trace
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        why = exc.strerror or exc
        raise HpcdlError(f"--trace {path}: cannot write it ({why}); the run itself is complete") from None
    return sum(e["ph"] == "X" for e in events)
