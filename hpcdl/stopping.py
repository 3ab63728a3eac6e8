"""Early stopping and the best epoch: one metric of the epoch records watched across epochs (and resumes).

`run.early_stop = {metric, patience, mode}` ends training after `patience` epochs without an
improvement; `run.keep_best` keeps the best epoch's checkpoint. Both read the same records on
every rank (figures summed over ranks), so every rank reaches the same verdict without a collective.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hpcdl.config import RunConfig


@dataclass
class BestEpoch:
    """The metric watched, the best value so far, its epoch, and epochs since it last improved."""

    metric: str = "val_loss"
    mode: str = "min"
    patience: int = 0  # 0: no early stopping (only the best is tracked)
    best: float | None = None
    best_epoch: float = 0.0
    stale: int = 0

    @classmethod
    def from_config(cls, run: RunConfig, saved: dict[str, Any] | None = None) -> BestEpoch:
        """The watch `run.early_stop` asks for (else val_loss, lower is better), continued from a checkpoint's."""
        stop = run.early_stop
        watch = cls(stop["metric"], stop["mode"], stop["patience"]) if stop else cls()
        if saved and saved.get("metric") == watch.metric and saved.get("mode") == watch.mode:
            watch.best, watch.best_epoch, watch.stale = saved["best"], saved["best_epoch"], saved["stale"]
        return watch

    def update(self, record: dict[str, Any]) -> bool:
        """Take an epoch's record; True when it is the best so far."""
        value = float(record[self.metric])
        better = math.isfinite(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        )
        if better:
            self.best, self.best_epoch, self.stale = value, float(record["epoch"]), 0
        else:
            self.stale += 1
        return better

    @property
    def should_stop(self) -> bool:
        """Early stopping is on and the metric has not improved for `patience` epochs."""
        return bool(self.patience) and self.stale >= self.patience

    def to_checkpoint(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run counts patience on."""
        return asdict(self)
