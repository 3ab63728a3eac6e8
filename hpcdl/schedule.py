"""Learning-rate schedules over optimizer steps: `train.schedule` with a linear warm-up of `train.lr_warmup_steps`.

Each is a `LambdaLR` whose factor depends only on the optimizer step, so a resumed run (the
scheduler's state is in every checkpoint) takes the same rates as an uninterrupted one:

- constant: lr;
- cosine: from lr down to 0 over the steps after warm-up (half a cosine);
- step: lr x gamma^k after k x `lr_step_every` steps (default: decays at a third and two thirds of the run);
- onecycle: up from lr/25 to lr over the first 30% (or the warm-up) then down to lr/10^4, as torch's OneCycleLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hpcdl.config import TrainConfig

ONECYCLE_RISE = 0.3  # share of the run spent rising, as torch's OneCycleLR (pct_start)
ONECYCLE_START, ONECYCLE_END = 1 / 25, 1 / 25 / 1e4  # factors at the start and the end (div_factor, final_div)


def factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at optimizer step k (0-based) of a run of `total_steps`."""
    warmup, total = cfg.lr_warmup_steps, max(1, total_steps)

    def warm(k: int) -> float | None:
        return (k + 1) / (warmup + 1) if k < warmup else None

    if cfg.schedule == "cosine":
        return lambda k: warm(k) or 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, total - warmup))))
    if cfg.schedule == "step":
        every = cfg.lr_step_every or max(1, total // 3)
        return lambda k: warm(k) or cfg.lr_gamma ** ((k - warmup) // every)
    if cfg.schedule == "onecycle":
        rise = warmup or max(1, int(ONECYCLE_RISE * total))

        def onecycle(k: int) -> float:
            if k < rise:
                return ONECYCLE_START + (1 - ONECYCLE_START) * (1 - math.cos(math.pi * k / rise)) / 2
            done = min(1.0, (k - rise) / max(1, total - rise))
            return ONECYCLE_END + (1 - ONECYCLE_END) * (1 + math.cos(math.pi * done)) / 2

        return onecycle
    return lambda k: warm(k) or 1.0


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The config's schedule on `optimizer`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor(cfg, total_steps))
