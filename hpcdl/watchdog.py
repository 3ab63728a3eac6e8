"""Hang watchdog: a thread per rank with a deadline per training step.

When a step overruns `limit_s`, each rank's watchdog thread sends a short report (its
step, the phase its main thread is in, and that thread's stack) to rank 0 over a
communicator of its own, so the report needs nothing from a stuck main thread. Rank 0
names the ranks that never arrived at the step's communication, prints their stacks and
ends the job with MPI_Abort. A rank in phase `comm` has arrived and waits for the others.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import traceback
from typing import Any

from hpcdl.comm import World, abort, mpi
from hpcdl.metrics import PhaseTimer

REPORT_TAG = 7
STACK_LINES = 12  # innermost stack lines shown per stuck rank


class Watchdog:
    """Arm with `begin(step)` as a step starts, disarm with `end()`; `close()` at the end of training."""

    def __init__(self, world: World, limit_s: float, timer: PhaseTimer, grace_s: float = 3.0):
        self.world, self.limit_s, self.timer, self.grace_s = world, limit_s, timer, grace_s
        self.step, self.began = 0, None
        self.main_thread = threading.main_thread().ident
        self.stopping = threading.Event()
        self.thread = None
        if limit_s > 0:
            # Collective: every rank builds its watchdog at the same point of the run.
            self.side = world.comm.Dup()
            self.thread = threading.Thread(target=self._watch, name="hpcdl-watchdog", daemon=True)
            self.thread.start()
            atexit.register(self.close)

    def begin(self, step: int) -> None:
        """A step starts: its deadline is limit_s from now."""
        self.step, self.began = step, time.monotonic()

    def end(self) -> None:
        """The step finished: nothing to watch until the next one."""
        self.began = None

    def close(self) -> None:
        """Stop the thread; also at exit, before MPI is finalized (no MPI call may race Finalize)."""
        if self.thread is not None:
            self.stopping.set()
            self.thread.join()
            self.thread = None

    def _watch(self) -> None:
        poll = min(0.5, self.limit_s / 4)
        while not self.stopping.wait(poll):
            began = self.began
            overdue = began is not None and time.monotonic() - began > self.limit_s
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
            abort(describe(reports, self.world.size, self.limit_s))
        # Rank 0 ends the job; if it cannot (dead or wedged), this rank does after a longer wait.
        deadline = time.monotonic() + 3 * self.grace_s
        while time.monotonic() < deadline and not request.Test():
            time.sleep(0.05)
        time.sleep(max(0.0, deadline - time.monotonic()))
        abort(
            f"watchdog: step {self.step} did not finish within {self.limit_s:g} s "
            "and rank 0 did not report; ending the job"
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


def describe(reports: dict[int, dict[str, Any]], size: int, limit_s: float) -> str:
    """The watchdog's report: who did not arrive, where each rank was, and the stuck ranks' stacks."""
    step = max((r["step"] for r in reports.values()), default=0)
    arrived = sorted(rank for rank, r in reports.items() if r["phase"] == "comm")
    silent = [rank for rank in range(size) if rank not in reports]
    stuck = sorted(rank for rank in reports if rank not in arrived) + silent
    lines = [
        f"watchdog: step {step} did not finish within {limit_s:g} s; "
        f"rank(s) {', '.join(map(str, sorted(stuck))) or 'none'} did not arrive at the step's communication"
        + (f" (rank(s) {', '.join(map(str, arrived))} were waiting in it)" if arrived else "")
    ]
    for rank in range(size):
        if rank in silent:
            lines.append(f"  rank {rank}: no report (the process is dead or does not let its threads run)")
            continue
        report = reports[rank]
        lines.append(f"  rank {rank}: step {report['step']}, {report['phase']}")
        if rank in stuck and report["stack"]:
            tail = report["stack"].rstrip("\n").splitlines()[-STACK_LINES:]
            lines += ["    " + line for line in tail]
    return "\n".join(lines)
