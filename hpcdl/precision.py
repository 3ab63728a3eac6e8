"""Mixed precision (`train.precision`): forward under torch.autocast, master weights and gradients in fp32.

bf16 needs nothing more (its range is fp32's). fp16 underflows small gradients, so its loss is
multiplied by a dynamic scale before backward and the summed gradients divided by it before the
optimizer; a step whose gradients overflowed (Inf/NaN on any rank: the step guard's one Allreduce
already says so) is skipped on every rank and the scale halved; after `GROWTH_INTERVAL` good steps
it doubles. That is torch.amp.GradScaler's rule, decided once for all ranks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # config.PRECISIONS: these and fp32
INITIAL_SCALE = 2.0**16
GROWTH_INTERVAL = 2000


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The forward's context: torch.autocast in bf16/fp16, nothing for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@dataclass
class LossScaler:
    """fp16's dynamic loss scale (1 and inert for fp32 and bf16)."""

    enabled: bool = False
    scale: float = 1.0
    good_steps: int = 0

    @classmethod
    def for_precision(cls, precision: str, saved: dict[str, Any] | None = None) -> LossScaler:
        """A scaler for `precision`, continued from a checkpoint's state."""
        if precision != "fp16":
            return cls()
        if saved and saved.get("enabled"):
            return cls(**saved)
        return cls(True, INITIAL_SCALE)

    def unscale(self, params: list[torch.nn.Parameter]) -> None:
        """Divide the summed gradients by the scale, before clipping and the optimizer."""
        if self.enabled:
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(1.0 / self.scale)

    def update(self, overflowed: bool) -> None:
        """After a step's verdict: halve on overflow, double after GROWTH_INTERVAL good steps."""
        if not self.enabled:
            return
        if overflowed:
            self.scale, self.good_steps = self.scale / 2, 0  # the step itself counts in skipped_steps
            return
        self.good_steps += 1
        if self.good_steps == GROWTH_INTERVAL:
            self.scale, self.good_steps = self.scale * 2, 0

    def to_checkpoint(self) -> dict[str, Any]:
        """The scale and its counters, so a resumed fp16 run continues bitwise."""
        return asdict(self)
