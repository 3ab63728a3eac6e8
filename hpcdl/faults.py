"""Fault injection for tests: `--fault KIND@RANK:STEP`, off unless asked for.

STEP counts optimizer steps from 1 (the step that ends with global step = STEP); for hang-eval it
is the epoch, from 1, whose evaluation hangs.

- kill:    the rank SIGKILLs itself as the step starts (a lost node);
- raise:   the rank raises an exception (a bug);
- hang:    the rank sleeps forever (a stuck read or a deadlock);
- stall:   the rank sleeps 3 s, then goes on (a slow step, time to send a signal);
- nan:     the rank's batch becomes NaN, so its loss and the summed gradients are NaN;
- signal:  the rank sends itself SIGUSR1 (a signal that reached only some ranks);
- diverge: after the step the rank nudges one parameter (replicas no longer agree);
- hang-eval: the rank sleeps forever as the evaluation after epoch STEP starts (a stuck read of /val);
- hang-save: the rank sleeps forever in the checkpoint at step STEP (on rank 0: a stuck file system
  while it writes; elsewhere: as it goes to wait for rank 0's write).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import torch

from hpcdl.data.loader import Batch
from hpcdl.errors import ConfigError

KINDS = ("kill", "raise", "hang", "stall", "nan", "signal", "diverge", "hang-eval", "hang-save")
STALL_S = 3.0
SPEC = re.compile(r"^(?P<kind>[a-z-]+)@(?P<rank>\d+):(?P<step>\d+)$")


@dataclass(frozen=True)
class Fault:
    """One injected fault: what happens, on which rank, at which step."""

    kind: str
    rank: int
    step: int


def parse(spec: str, world_size: int) -> Fault:
    """'kill@2:5' -> Fault('kill', 2, 5); a bad spec raises ConfigError naming what is wrong."""
    match = SPEC.match(spec.strip())
    if not match:
        raise ConfigError(f"--fault {spec!r}: expected KIND@RANK:STEP, e.g. kill@1:5 (kinds: {', '.join(KINDS)})")
    kind, rank, step = match["kind"], int(match["rank"]), int(match["step"])
    if kind not in KINDS:
        raise ConfigError(f"--fault {spec!r}: unknown kind '{kind}' (kinds: {', '.join(KINDS)})")
    if rank >= world_size:
        raise ConfigError(f"--fault {spec!r}: rank {rank} does not exist in a job of {world_size} ranks")
    if step < 1:
        raise ConfigError(f"--fault {spec!r}: steps count from 1")
    return Fault(kind, rank, step)


class Injector:
    """The faults of this rank, fired at the step boundaries the training loop reports."""

    def __init__(self, specs: list[str], rank: int, world_size: int):
        faults = [parse(spec, world_size) for spec in specs]
        self.rank = rank
        self.mine = {(f.kind, f.step) for f in faults if f.rank == rank}

    def _due(self, kind: str, step: int, unit: str = "step") -> bool:
        if (kind, step) not in self.mine:
            return False
        print(f"hpcdl: fault: injecting {kind} on rank {self.rank} at {unit} {step}", file=sys.stderr, flush=True)
        return True

    def step_start(self, step: int, batch: Batch) -> None:
        """Faults that strike as a step begins, before its forward pass."""
        if not self.mine:
            return
        if self._due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due("raise", step):
            raise RuntimeError(f"injected fault: raise on rank {self.rank} at step {step}")
        if self._due("signal", step):
            os.kill(os.getpid(), signal.SIGUSR1)
        if self._due("stall", step):
            time.sleep(STALL_S)
        if self._due("nan", step):
            batch.x = torch.full_like(batch.x, float("nan"))
        if self._due("hang", step):
            hang()

    def step_end(self, step: int, params: list[torch.nn.Parameter]) -> None:
        """Faults that strike after the optimizer step."""
        if self.mine and self._due("diverge", step):
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-3

    def evaluation(self, epoch: int) -> None:
        """Faults that strike as the evaluation after `epoch` (from 1) starts."""
        if self.mine and self._due("hang-eval", epoch, "epoch"):
            hang()

    def checkpoint(self, step: int) -> None:
        """Faults that strike inside the checkpoint at `step`, where rank 0 writes it."""
        if self.mine and self._due("hang-save", step):
            hang()


def hang() -> None:
    """Sleep forever, as a rank stuck in a read, a write or a deadlock does (its threads still run)."""
    while True:
        time.sleep(1.0)
