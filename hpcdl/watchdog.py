"""Hang watchdog: a thread per rank with a deadline per training step, evaluation and save.

When a step (or an evaluation, a checkpoint, the final model.pt: a *section*) overruns its
limit, each rank's watchdog thread sends a short report (what it is in, the phase its main
thread is in, and that thread's stack) to rank 0 over a communicator of its own, so the
report needs nothing from a stuck main thread. Rank 0 names the ranks that never arrived at
the communication, prints their stacks and ends the job with MPI_Abort. A rank in phase
`comm` (a section: one that called `arrive`) has arrived and waits for the others.

The limit is `run.watchdog_s`: a number of seconds, 0 for none, or "auto" (the default,
see `StepLimit`), so that a stopped or vanished rank ends the job within about a minute.
A section gets the step limit; an evaluation gets it anew for every batch, each a forward
only, less work than a training step.
"""

from __future__ import annotations

import atexit
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hpcdl.comm import World, abort, rank_ranges
from hpcdl.metrics import PhaseTimer

REPORT_TAG = 7
STACK_LINES = 12  # innermost stack lines shown per stuck rank

# run.watchdog_s = "auto": a step may take AUTO_FACTOR times the median step, never less than AUTO_FLOOR_S.
AUTO_FLOOR_S = 60.0
AUTO_FACTOR = 20.0
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

    The first step has no measurement yet and gets the floor as well. On a CPU it does a later
    step's work plus one-time costs (first-touch allocation, the optimizer's lazy state, the
    loader's first reads): seconds, where the floor allows a minute. Any longer allowance is
    how long a rank stopped in the first steps, or in a run of a few steps, holds the job.
    The first steps' extra time is measured like any other: it only raises the median (a
    looser limit) until the window's later steps outnumber it. A run whose first step needs
    more than a minute sets run.watchdog_s to seconds; the report says so.
    """

    def __init__(self, setting: float | str):
        self.auto = setting == "auto"
        self.seconds = AUTO_FLOOR_S if self.auto else float(setting)
        self.median = 0.0
        self.recent: deque[float] = deque(maxlen=AUTO_WINDOW)

    def record(self, seconds: float) -> None:
        """A step took `seconds`: with "auto", the next step's limit follows the median."""
        if not self.auto:
            return
        self.recent.append(seconds)
        self.median = statistics.median(self.recent)
        self.seconds = max(AUTO_FLOOR_S, AUTO_FACTOR * self.median)

    def __str__(self) -> str:
        # Read by the watchdog thread while the main thread may record: only the floats, never the deque.
        if not self.auto:
            return f"{self.seconds:g} s (run.watchdog_s)"
        if not self.median:
            return (
                f"{self.seconds:g} s (run.watchdog_s 'auto', before any step is measured; "
                "set run.watchdog_s to seconds if a step needs longer)"
            )
        return (
            f"{self.seconds:.0f} s (run.watchdog_s 'auto': {AUTO_FACTOR:g} x the median step of "
            f"{1000 * self.median:.3g} ms, at least {AUTO_FLOOR_S:g} s)"
        )


class Watchdog:
    """Arm with `begin(step)` as a step starts and `end()` as it ends, or `with watching(what):` around a section
    outside the steps (evaluation, a checkpoint, the final save); `close()` at the end of training."""

    def __init__(self, world: World, limit_s: float | str, timer: PhaseTimer, grace_s: float = 3.0):
        self.world, self.limit, self.timer, self.grace_s = world, StepLimit(limit_s), timer, grace_s
        self.step, self.what, self.per = 0, None, ""  # what is watched: a step, or a section (limit per `per`)
        self.began, self.deadline, self.arrived = None, None, False
        self.seq = 0  # steps and sections begun: every rank goes through the same ones, so this orders their reports
        self.main_thread = threading.main_thread().ident
        self.stopping = threading.Event()
        self.thread = None
        if self.limit.seconds > 0:
            # Collective: every rank builds its watchdog at the same point of the run.
            self.side = world.dup()
            self.thread = threading.Thread(target=self._watch, name="hpcdl-watchdog", daemon=True)
            self.thread.start()
            atexit.register(self.close)

    def begin(self, step: int) -> None:
        """A step starts: its deadline is the step limit from now."""
        self.step, self.what, self.per = step, None, ""
        self._arm()

    def end(self) -> None:
        """The step finished: nothing to watch until the next one; its time feeds the "auto" limit."""
        if self.began is not None:
            self.limit.record(time.monotonic() - self.began)
        self.disarm()

    def disarm(self) -> None:
        """Nothing to watch (a step that was not taken, a section's end); nothing measured."""
        self.deadline, self.began = None, None

    @contextmanager
    def watching(self, what: str, per: str = "") -> Iterator[None]:
        """Watch a section named `what` (e.g. "evaluation after epoch 2") for the step limit, or for the step limit
        `per` unit of its work (e.g. "batch": call `progress` after each).

        A section is not a step: its time does not feed the "auto" limit. Call `arrive` where this
        rank's own part ends and it waits for the others, so that the report can tell them apart.
        """
        self.what, self.per, self.arrived = what, per, False
        self._arm()
        try:
            yield
        finally:
            self.disarm()

    def progress(self) -> None:
        """In a section watched per unit of work: one unit done, the next gets the limit anew."""
        self.deadline = time.monotonic() + self.limit.seconds

    def arrive(self) -> None:
        """In a section: this rank has done its own part and waits for the others in the communication."""
        self.arrived = True

    def close(self) -> None:
        """Stop the thread; also at exit, before MPI is finalized (no MPI call may race Finalize)."""
        if self.thread is not None:
            self.stopping.set()
            self.thread.join()
            self.thread = None

    def _arm(self) -> None:
        self.seq += 1
        self.began = time.monotonic()
        self.deadline = self.began + self.limit.seconds

    def _watch(self) -> None:
        poll = min(0.5, self.limit.seconds / 4)
        while not self.stopping.wait(poll):
            deadline = self.deadline
            overdue = deadline is not None and time.monotonic() > deadline
            # Rank 0 also listens: another rank's report means a hang even where rank 0 is between steps.
            if overdue or (self.world.is_root and self.side.iprobe(tag=REPORT_TAG)):
                self._expire()
                return

    def _label(self) -> str:
        return self.what or f"step {self.step}"

    def _allowed(self) -> str:
        return f"{self.limit} per {self.per}" if self.per else str(self.limit)

    def _report(self) -> dict[str, Any]:
        frame = sys._current_frames().get(self.main_thread)
        stack = traceback.format_stack(frame) if frame is not None else []
        if self.began is None:
            phase = "between steps"
        elif self.what is None:
            phase = self.timer.current or "between phases"
        else:  # a section is not timed by phases: only whether the rank has reached its communication
            phase = "comm" if self.arrived else "before its communication"
        return {
            "rank": self.world.rank, "seq": self.seq, "what": self._label(), "in_step": self.what is None,
            "limit": self._allowed(), "phase": phase, "stack": "".join(stack),
        }  # fmt: skip

    def _expire(self) -> None:
        request = self.side.isend(self._report(), dest=0, tag=REPORT_TAG)
        if self.world.is_root:
            abort(describe(self._collect(), self.world))
        # Rank 0 ends the job; if it cannot (dead or wedged), this rank does after a longer wait.
        deadline = time.monotonic() + 3 * self.grace_s
        while time.monotonic() < deadline and not request.test():
            time.sleep(0.05)
        time.sleep(max(0.0, deadline - time.monotonic()))
        abort(
            f"watchdog: {self._label()} did not finish within {self._allowed()} "
            "and rank 0 did not report (it is stopped, dead or does not let its threads run); ending the job"
        )

    def _collect(self) -> dict[int, dict[str, Any]]:
        """Reports from every rank that can still send one, for up to grace_s."""
        reports: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.grace_s
        while len(reports) < self.world.size and time.monotonic() < deadline:
            if self.side.iprobe(tag=REPORT_TAG):
                report = self.side.recv(tag=REPORT_TAG)
                reports[report["rank"]] = report
            else:
                time.sleep(0.02)
        return reports


def describe(reports: dict[int, dict[str, Any]], world: World) -> str:
    """The watchdog's report: what did not finish, who did not arrive (and on which node), where each rank was,
    the stuck ranks' stacks."""
    furthest = max(reports.values(), key=lambda r: r["seq"])  # what the ranks that went furthest wait to finish
    arrived = sorted(rank for rank, r in reports.items() if r["phase"] == "comm")
    silent = [rank for rank in range(world.size) if rank not in reports]
    stuck = sorted(rank for rank in reports if rank not in arrived) + silent
    spans_hosts = any(world.where(rank) for rank in range(world.size))
    stuck_hosts = f" on {', '.join(sorted({world.hosts[rank] for rank in stuck}))}" if spans_hosts and stuck else ""
    communication = "the step's communication" if furthest["in_step"] else "its communication"
    lines = [
        f"watchdog: {furthest['what']} did not finish within {furthest['limit']}; "
        f"rank(s) {rank_ranges(stuck) or 'none'}{stuck_hosts} did not arrive at {communication}"
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
        lines.append(f"  rank {rank}{world.where(rank)}: {report['what']}, {report['phase']}")
        if rank in stuck and report["stack"]:
            tail = report["stack"].rstrip("\n").splitlines()[-STACK_LINES:]
            lines += ["    " + line for line in tail]
    return "\n".join(lines)
