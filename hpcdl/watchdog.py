"""Hang watchdog: a thread per rank with a deadline per training step.

When a step overruns its limit, each rank's watchdog thread sends a short report (its
step, the phase its main thread is in, and that thread's stack) to rank 0 over a
communicator of its own, so the report needs nothing from a stuck main thread. Rank 0
names the ranks that never arrived at the step's communication, prints their stacks and
ends the job with MPI_Abort. A rank in phase `comm` has arrived and waits for the others.

The limit is `run.watchdog_s`: a number of seconds, 0 for none, or "auto" (the default,
see `StepLimit`), so that a stopped or vanished rank ends the job within about a minute.
"""

from __future__ import annotations

import atexit
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

from hpcdl.comm import World, abort, mpi, rank_ranges
from hpcdl.metrics import PhaseTimer

REPORT_TAG = 7
STACK_LINES = 12  # innermost stack lines shown per stuck rank

# run.watchdog_s = "auto": a step may take AUTO_FACTOR times the median step, never less than AUTO_FLOOR_S.
AUTO_FLOOR_S = 60.0
AUTO_FACTOR = 20.0
# The first steps allocate, initialise lazily or compile: they are not measured, and may take AUTO_WARMUP_S each.
AUTO_WARMUP_STEPS = 3
AUTO_WARMUP_S = 300.0
# The median is over this many recent steps, so that the limit follows a run whose steps slow down.
AUTO_WINDOW = 101


class StepLimit:
    """How long one step may run: a fixed number of seconds, or "auto" (derived from measured steps).

    "auto" needs no collective in the hot path: each rank takes the median of its own recent
    step times (begin to end). Every step ends in a collective that waits for the slowest rank
    (the gradient sync, the stop/NaN flags), so a rank's step time already holds its wait for
    the slowest one: each rank's median is the slowest rank's median, and every rank arrives
    at about the same limit without exchanging it. (Steps that only accumulate gradients end
    in no collective; there a fast rank's median is lower, which the floor of a minute covers.)
    """

    def __init__(self, setting: float | str):
        self.auto = setting == "auto"
        self.seconds = AUTO_WARMUP_S if self.auto else float(setting)
        self.steps, self.median = 0, 0.0
        self.recent: deque[float] = deque(maxlen=AUTO_WINDOW)

    def record(self, seconds: float) -> None:
        """A step took `seconds`: with "auto", the next step's limit follows the median after warm-up."""
        self.steps += 1
        if not self.auto or self.steps <= AUTO_WARMUP_STEPS:
            return
        self.recent.append(seconds)
        self.median = statistics.median(self.recent)
        self.seconds = max(AUTO_FLOOR_S, AUTO_FACTOR * self.median)

    def __str__(self) -> str:
        # Read by the watchdog thread while the main thread may record: only the floats, never the deque.
        if not self.auto:
            return f"{self.seconds:g} s (run.watchdog_s)"
        if not self.median:
            return f"{self.seconds:g} s (run.watchdog_s 'auto', during the first {AUTO_WARMUP_STEPS + 1} steps)"
        return (
            f"{self.seconds:.0f} s (run.watchdog_s 'auto': {AUTO_FACTOR:g} x the median step of "
            f"{1000 * self.median:.3g} ms, at least {AUTO_FLOOR_S:g} s)"
        )


class Watchdog:
    """Arm with `begin(step)` as a step starts, disarm with `end()`; `close()` at the end of training."""

    def __init__(self, world: World, limit_s: float | str, timer: PhaseTimer, grace_s: float = 3.0):
        self.world, self.limit, self.timer, self.grace_s = world, StepLimit(limit_s), timer, grace_s
        self.step, self.began, self.deadline = 0, None, None
        self.main_thread = threading.main_thread().ident
        self.stopping = threading.Event()
        self.thread = None
        if self.limit.seconds > 0:
            # Collective: every rank builds its watchdog at the same point of the run.
            self.side = world.comm.Dup()
            self.thread = threading.Thread(target=self._watch, name="hpcdl-watchdog", daemon=True)
            self.thread.start()
            atexit.register(self.close)

    def begin(self, step: int) -> None:
        """A step starts: its deadline is the step limit from now."""
        self.step, self.began = step, time.monotonic()
        self.deadline = self.began + self.limit.seconds

    def end(self) -> None:
        """The step finished: nothing to watch until the next one; its time feeds the "auto" limit."""
        self.deadline = None
        if self.began is not None:
            self.limit.record(time.monotonic() - self.began)
        self.began = None

    def close(self) -> None:
        """Stop the thread; also at exit, before MPI is finalized (no MPI call may race Finalize)."""
        if self.thread is not None:
            self.stopping.set()
            self.thread.join()
            self.thread = None

    def _watch(self) -> None:
        poll = min(0.5, self.limit.seconds / 4)
        while not self.stopping.wait(poll):
            deadline = self.deadline
            overdue = deadline is not None and time.monotonic() > deadline
            # Rank 0 also listens: another rank's report means a hang even where rank 0 is between steps.
            if overdue or (self.world.is_root and self.side.iprobe(source=mpi().ANY_SOURCE, tag=REPORT_TAG)):
                self._expire()
                return

    def _report(self) -> dict[str, Any]:
        frame = sys._current_frames().get(self.main_thread)
        stack = traceback.format_stack(frame) if frame is not None else []
        phase = self.timer.current or ("between phases" if self.began is not None else "between steps")
        return {"rank": self.world.rank, "step": self.step, "phase": phase, "stack": "".join(stack)}

    def _expire(self) -> None:
        request = self.side.isend(self._report(), dest=0, tag=REPORT_TAG)
        if self.world.is_root:
            reports = self._collect()
            abort(describe(reports, self.world, str(self.limit)))
        # Rank 0 ends the job; if it cannot (dead or wedged), this rank does after a longer wait.
        deadline = time.monotonic() + 3 * self.grace_s
        while time.monotonic() < deadline and not request.Test():
            time.sleep(0.05)
        time.sleep(max(0.0, deadline - time.monotonic()))
        abort(
            f"watchdog: step {self.step} did not finish within {self.limit} "
            "and rank 0 did not report (it is stopped, dead or does not let its threads run); ending the job"
        )

    def _collect(self) -> dict[int, dict[str, Any]]:
        """Reports from every rank that can still send one, for up to grace_s."""
        reports: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.grace_s
        while len(reports) < self.world.size and time.monotonic() < deadline:
            if self.side.iprobe(source=mpi().ANY_SOURCE, tag=REPORT_TAG):
                report = self.side.recv(source=mpi().ANY_SOURCE, tag=REPORT_TAG)
                reports[report["rank"]] = report
            else:
                time.sleep(0.02)
        return reports


def describe(reports: dict[int, dict[str, Any]], world: World, limit: str) -> str:
    """The watchdog's report: who did not arrive (and on which node), where each rank was, the stuck ranks' stacks."""
    step = max((r["step"] for r in reports.values()), default=0)
    arrived = sorted(rank for rank, r in reports.items() if r["phase"] == "comm")
    silent = [rank for rank in range(world.size) if rank not in reports]
    stuck = sorted(rank for rank in reports if rank not in arrived) + silent
    spans_hosts = any(world.where(rank) for rank in range(world.size))
    stuck_hosts = f" on {', '.join(sorted({world.hosts[rank] for rank in stuck}))}" if spans_hosts and stuck else ""
    lines = [
        f"watchdog: step {step} did not finish within {limit}; "
        f"rank(s) {rank_ranges(stuck) or 'none'}{stuck_hosts} did not arrive at the step's communication"
        + (f" (rank(s) {rank_ranges(arrived)} were waiting in it)" if arrived else "")
    ]
    for rank in range(world.size):
        if rank in silent:
            lines.append(
                f"  rank {rank}{world.where(rank)}: no report (the process is dead, stopped, "
                "or does not let its threads run)"
            )
            continue
        report = reports[rank]
        lines.append(f"  rank {rank}{world.where(rank)}: step {report['step']}, {report['phase']}")
        if rank in stuck and report["stack"]:
            tail = report["stack"].rstrip("\n").splitlines()[-STACK_LINES:]
            lines += ["    " + line for line in tail]
    return "\n".join(lines)
