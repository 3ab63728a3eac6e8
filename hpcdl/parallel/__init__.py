"""Ways of splitting the work. A strategy owns one step: placement, batch split, communication.

The training loop talks to every strategy through the same few members:

- `params`: the parameters this rank optimises;
- `data_rank`, `data_size`: this rank's place among the ranks that split each global batch;
- `train_step(batch, timer, sync, scale)` -> (summed loss, correct, samples) of this rank's share;
- `evaluate_batch(batch)` -> the same without learning;
- `zero_grad()`, `sync_optimizer(optimizer)` (make replicas' optimizer state equal);
- `model_state()`: the whole unsplit model's state (complete on rank 0), for checkpoints;
- `optimizer_state(optimizer)` / `load_optimizer_state(optimizer, state)`.
"""

from __future__ import annotations

from torch import nn

from hpcdl.comm import World
from hpcdl.config import Config
from hpcdl.parallel.data import DataParallel


def make_strategy(cfg: Config, world: World, model: nn.Module):
    """The strategy named by `parallel.mode`, wrapping `model` (built identically on every rank)."""
    par = cfg.parallel
    return DataParallel(model, world, par.bucket_mb, par.overlap, par.compression)
