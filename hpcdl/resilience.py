"""Stopping cleanly and catching numerical faults: signals, one reduced flag vector per step,
the NaN/Inf policy, and a periodic check that replicas still hold the same parameters.

Per step every rank contributes [signal received, rank key of a non-finite loss, non-finite
gradient] to ONE small MAX-Allreduce, so a signal that reached one rank, or a NaN on one
rank, is acted on by all ranks at the same step.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch

from hpcdl.comm import EXIT_REQUEUE, World
from hpcdl.errors import TrialFailed
from hpcdl.parallel.strategy import Strategy
from hpcdl.precision import LossScaler

# Ctrl-C (SIGINT) stops like the batch system's SIGTERM and the requeue warning SIGUSR1.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ROWS_NAMED = 8  # rows of a batch named in a non-finite loss message


class StopSignals:
    """SIGTERM/SIGUSR1/SIGINT ask for a checkpoint and a clean stop; a second signal ends the rank at once.

    Python runs signal handlers only between bytecodes, so a main thread blocked in an MPI call
    would not see a second signal. The interpreter's C-level handler also writes each signal's
    number to a wakeup pipe; a thread reading it counts signals as they arrive.
    """

    def __init__(self) -> None:
        self.received = 0  # the first stop signal's number, 0 if none
        self.saved = False  # the stop's checkpoint is written: a second signal still means "requeue me"
        self.saved_line = ""  # said by a second signal after the save (rank 0's "stopped by ...; checkpoint ...")
        self.previous: dict[int, object] = {}
        self.previous_wakeup = -1
        self.write_fd = -1

    def install(self) -> None:
        """Catch the stop signals (only from the main thread, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._on_signal)
        read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._count, args=(read_fd,), name="hpcdl-signals", daemon=True).start()

    def _on_signal(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def _count(self, read_fd: int) -> None:
        seen = 0
        while data := os.read(read_fd, 64):  # b"" once uninstall closes the write end
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                seen += 1
                self.received = self.received or signum
                if seen > 1:
                    name = signal.Signals(signum).name
                    print(f"hpcdl: second stop signal ({name}): ending at once", file=sys.stderr, flush=True)
                    if self.saved and self.saved_line:
                        print(self.saved_line, flush=True)
                    os._exit(EXIT_REQUEUE if self.saved else 128 + signum)
        os.close(read_fd)

    def checkpointed(self, line: str) -> None:
        """The stop's checkpoint is on disk: from now a second signal says `line` (if any) and exits 75."""
        self.saved_line, self.saved = line, True

    def uninstall(self) -> None:
        """Give back the handlers and wakeup fd found at install; call it once the run's last checkpoint is written.

        After a stop, the handlers stay: a further stop signal (Slurm and the launcher often both
        send SIGTERM) ends the rank at once with status 75, as its checkpoint is on disk.
        """
        if self.received:
            self.saved = True
            return
        if not self.previous:
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
        signal.set_wakeup_fd(self.previous_wakeup)
        os.close(self.write_fd)


@dataclass
class Verdict:
    """What every rank does with the step just computed: apply it or skip it, and whether to stop."""

    apply: bool = True
    stop_signal: str | None = None


def first_nonfinite(params: list[torch.nn.Parameter], names: list[str]) -> str:
    """The first parameter whose gradient holds NaN or Inf, with the kind found."""
    for name, p in zip(names, params):
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"{name} ({'NaN' if torch.isnan(p.grad).any() else 'Inf'})"
    return "none"


class StepGuard:
    """The per-step agreement (stop request, NaN/Inf) and the every-K-steps replica check."""

    def __init__(
        self, world: World, strategy: Strategy, nan_policy: str = "abort", check_every: int = 0, data_path: str = "",
        scaler: LossScaler | None = None,
    ):  # fmt: skip
        self.world, self.strategy, self.nan_policy, self.data_path = world, strategy, nan_policy, data_path
        self.scaler = scaler or LossScaler()  # fp16: overflowing gradients skip the step and halve the scale
        self.names = strategy.param_names
        self.signals = StopSignals()
        # Replicas can be compared only when every rank holds the whole model (data parallel).
        self.check_every = check_every if strategy.replicated else 0
        self.flags = np.zeros(4)
        self.failure: str | None = None  # a contained world: this rank's step raised; said at the next sync point

    def after_sync(self, step: int, loss_sum: float, skipped: int, rows: np.ndarray | None = None) -> Verdict:
        """After the gradient sync, before the optimizer: one Allreduce decides for all ranks.

        `skipped` counts the steps skipped so far; `rows` are the /train rows of this rank's batch,
        named when its loss is not finite. A step that raised on a rank of a contained world
        (`failure`) ends the trial on every rank of it, with that rank's message.
        """
        self.flags[3] = self.world.size - self.world.rank if self.failure else 0
        grads = [p.grad for p in self.strategy.params if p.grad is not None]
        # A sum is the cheapest pass that NaN/Inf reach (~0.1 ms for 1.9 M gradients); only when it is
        # not finite (or a huge finite gradient overflowed it) is each element looked at.
        grad_bad = not math.isfinite(sum(float(g.sum()) for g in grads)) and any(
            not torch.isfinite(g).all() for g in grads
        )
        self.flags[0] = self.signals.received
        self.flags[1] = self.world.size - self.world.rank if not math.isfinite(loss_sum) else 0
        self.flags[2] = grad_bad
        self.world.allreduce_(self.flags, "max")
        if self.flags[3]:  # every rank saw it: the message's broadcast is matched everywhere
            failed_rank = self.world.size - int(self.flags[3])
            raise TrialFailed(f"rank {failed_rank}: {self.world.bcast(self.failure, root=failed_rank)}")
        stop_signal = signal.Signals(int(self.flags[0])).name if self.flags[0] else None
        if not (self.flags[1] or self.flags[2]):
            self.scaler.update(overflowed=False)
            return Verdict(True, stop_signal)
        if self.scaler.enabled and not self.flags[1]:  # a finite loss whose scaled gradients overflowed: expected
            self.scaler.update(overflowed=True)
            return Verdict(False, stop_signal)
        bad_rank = self.world.size - int(self.flags[1])
        where = f" on rank {bad_rank}" if self.flags[1] else ""
        what = "loss" if self.flags[1] else "gradients (the loss was finite on every rank)"
        cause = (
            f"non-finite {what} at step {step}{where}; first non-finite gradient: "
            f"{first_nonfinite(self.strategy.params, self.names)}"
        )
        if self.flags[1]:
            # Every rank reached this verdict together, so this extra collective is matched everywhere.
            note = self._batch_note(rows) if self.world.rank == bad_rank else None
            cause += self.world.bcast(note, root=bad_rank)
        if self.nan_policy == "abort":
            self.world.fail_all(f"{cause}; set run.nan_policy = 'skip' to skip such steps")
        self.world.log(f"hpcdl: step {step} skipped on all ranks: {cause} ({skipped + 1} skipped so far)")
        return Verdict(False, stop_signal)

    def _batch_note(self, rows: np.ndarray | None) -> str:
        """Which samples the batch held, and how to check them (a NaN loss often comes from the data)."""
        if rows is None or len(rows) == 0:
            return ""
        shown = ", ".join(str(int(r)) for r in np.sort(rows)[:ROWS_NAMED])
        more = f", ... ({len(rows)} in the batch)" if len(rows) > ROWS_NAMED else ""
        source = f" of /train in {self.data_path}" if self.data_path else " of /train"
        return (
            f"; the batch held rows {shown}{more}{source}; "
            f"check the data with `hpcdl data info {self.data_path or 'FILE'} --scan`"
        )

    def check_replicas(self, step: int) -> None:
        """Every `check_every` steps: a cheap reduced checksum per tensor; divergence ends the job."""
        if not self.check_every or step % self.check_every:
            return
        sums = np.array([bit_sum(p.detach()) for p in self.strategy.params], dtype=np.int64)
        both = np.concatenate([sums, -sums])
        self.world.allreduce_(both, "max")
        highest, lowest = both[: len(sums)], -both[len(sums) :]
        differing = np.flatnonzero(highest != lowest)
        if len(differing) == 0:
            return
        first = int(differing[0])
        # Every rank saw the same difference, so this extra collective is matched everywhere.
        per_rank = self.world.allgather(int(sums[first]))
        odd = [r for r, value in enumerate(per_rank) if value != per_rank[0]]
        self.world.fail_all(
            f"replicas diverged at step {step}: first differing tensor {self.names[first]} "
            f"(rank(s) {', '.join(map(str, odd))} differ from rank 0; {len(differing)} tensor(s) differ)",
        )


def bit_sum(tensor: torch.Tensor) -> int:
    """Sum of a tensor's bit patterns: any single flipped bit changes it, and it costs one pass."""
    flat = tensor.contiguous().view(-1)
    words = flat.view(torch.int32) if flat.element_size() == 4 else flat.view(torch.uint8)
    return int(words.sum(dtype=torch.int64))
