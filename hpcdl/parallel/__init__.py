"""Ways of splitting the work. A strategy owns one step: placement, batch split, communication.

The training loop talks to every strategy through the same few members:

- `params`: the parameters this rank optimises;
- `data_rank`, `data_size`: this rank's place among the ranks that split each global batch;
- `train_step(batch, timer, sync, scale)` -> (summed loss, correct, samples) of this rank's share;
- `evaluate_batch(batch)` -> the same without learning;
- `zero_grad()`, `sync_optimizer(optimizer)` (make replicas' optimizer state equal);
- `model_state()`: the whole unsplit model's state (complete on rank 0), for checkpoints;
- `optimizer_state(optimizer)` / `load_optimizer_state(optimizer, state)`.
- `bytes_per_sync` (optional): bytes this rank communicates per optimizer step, for scaling studies.

`batch_ranks(cfg, world_size)` says how many ranks split a batch (the world in data mode,
the replicas in pipeline and tensor mode) and rejects a layout that does not fill the world.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.config import Config
from hpcdl.errors import ConfigError
from hpcdl.parallel.data import DataParallel


def batch_ranks(cfg: Config, world_size: int) -> int:
    """How many ranks split each global batch; a layout that cannot fill `world_size` is a ConfigError."""
    par = cfg.parallel
    split = {"pipeline": ("stages", par.stages), "tensor": ("tensor", par.tensor)}.get(par.mode)
    if split is None:
        for key in ("stages", "replicas", "tensor"):
            if getattr(par, key) != 1:
                raise ConfigError(f"config: parallel.{key} is only used with parallel.mode = 'pipeline' or 'tensor'")
        return world_size
    key, degree = split
    if degree * par.replicas != world_size:
        fix = (
            f"use --set parallel.replicas={world_size // degree}"
            if world_size % degree == 0
            else f"run on a multiple of {degree} ranks"
        )
        raise ConfigError(
            f"config: parallel.{key} = {degree} x parallel.replicas = {par.replicas} needs "
            f"{degree * par.replicas} ranks, but the job has {world_size}; {fix} (or change parallel.{key})"
        )
    micro = par.micro_batches if par.mode == "pipeline" else 1
    batch = cfg.train.batch_size
    if batch % (par.replicas * micro):
        good = max(par.replicas * micro, batch - batch % (par.replicas * micro))
        raise ConfigError(
            f"config: train.batch_size = {batch} does not split into {par.replicas} replica(s) x {micro} "
            f"micro-batches; use a multiple of {par.replicas * micro} (e.g. {good}) or other parallel.micro_batches"
        )
    return par.replicas


def make_strategy(
    cfg: Config,
    world: World,
    model: nn.Module,
    feature_shape: tuple[int, ...] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
):
    """The strategy named by `parallel.mode`, wrapping `model` (built identically on every rank).

    `feature_shape` (one sample's) lets pipeline mode time its layers (`parallel.balance = "time"`);
    a meta-device `model` is allocated stage by stage, from `model_state` (a checkpoint's) if given.
    """
    par = cfg.parallel
    if par.mode == "pipeline":
        from hpcdl.parallel.pipeline import Pipeline

        sample = None
        if feature_shape is not None and par.balance == "time":
            rows = max(1, cfg.train.batch_size // (par.replicas * par.micro_batches))
            sample = torch.randn(rows, *feature_shape, generator=torch.Generator().manual_seed(0))
        return Pipeline(
            model, par.stages, par.micro_batches, par.schedule, world, par.replicas,
            balance=par.balance, cuts=par.cuts or None, sample=sample,
            bucket_mb=par.bucket_mb, overlap=par.overlap, compression=par.compression,
            seed=cfg.train.seed, initial_state=model_state,
        )  # fmt: skip
    if par.mode == "tensor":
        from hpcdl.parallel.tensor import TensorParallel

        return TensorParallel(model, world, par.tensor, par.replicas, par.bucket_mb, par.overlap, par.compression)
    if cfg.data.partition == "columns":
        from hpcdl.parallel.columns import ColumnParallel

        return ColumnParallel(model, world)
    return DataParallel(model, world, par.bucket_mb, par.overlap, par.compression)
