"""Ways of splitting the work: a `Strategy` per `parallel.mode` (strategy.py), built on one checked `Layout`.

`make_strategy` is the only place that maps a mode to its class; the loop sees only `Strategy`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.config import Config
from hpcdl.device import CPU
from hpcdl.models import is_meta
from hpcdl.parallel.layout import Layout
from hpcdl.parallel.loss import Objective
from hpcdl.parallel.strategy import Strategy

Maker = Callable[[Config, Layout, World, nn.Module, tuple[int, ...], dict | None, torch.device], Strategy]


def _data(cfg: Config, layout: Layout, world: World, model: nn.Module, shape, state, device) -> Strategy:
    from hpcdl.parallel.data import DataParallelStrategy

    par = cfg.parallel
    return DataParallelStrategy(model, world, par.bucket_mb, par.overlap, par.compression)


def _pipeline(cfg: Config, layout: Layout, world: World, model: nn.Module, shape, state, device) -> Strategy:
    from hpcdl.parallel.pipeline import Pipeline

    par = cfg.parallel
    sample = None
    if par.balance == "time":
        rows = max(1, cfg.train.batch_size // layout.batch_parts)
        sample = torch.randn(rows, *shape, generator=torch.Generator().manual_seed(0))
    return Pipeline(
        model, layout.stages, layout.micro_batches, par.schedule, world, layout.replicas,
        balance=par.balance, cuts=list(layout.cuts) or None, sample=sample,
        bucket_mb=par.bucket_mb, overlap=par.overlap, compression=par.compression,
        seed=cfg.train.seed, initial_state=state, device=device,
    )  # fmt: skip


def _tensor(cfg: Config, layout: Layout, world: World, model: nn.Module, shape, state, device) -> Strategy:
    from hpcdl.parallel.tensor.strategy import TensorParallel

    par = cfg.parallel
    return TensorParallel(model, world, layout, par.bucket_mb, par.overlap, par.compression)


def _columns(cfg: Config, layout: Layout, world: World, model: nn.Module, shape, state, device) -> Strategy:
    from hpcdl.parallel.columns import ColumnParallel

    return ColumnParallel(model, world, layout)


def _local_sgd(cfg: Config, layout: Layout, world: World, model: nn.Module, shape, state, device) -> Strategy:
    from hpcdl.parallel.local_sgd import LocalSGD

    par = cfg.parallel
    return LocalSGD(
        model, world, par.local_steps, par.post_local_steps, par.average_optimizer, par.bucket_mb, par.overlap
    )


def _parameter_server(cfg: Config, layout: Layout, world: World, model: nn.Module, shape, state, device) -> Strategy:
    from hpcdl.parallel.param_server import ParameterServer

    par = cfg.parallel
    return ParameterServer(
        model, world, layout.servers, layout.mode == "ps-async", par.max_staleness, par.deterministic
    )


def _zero(cfg: Config, layout: Layout, world: World, model: nn.Module, shape, state, device) -> Strategy:
    from hpcdl.parallel.zero import ZeroDataParallel

    return ZeroDataParallel(model, world, cfg.parallel.zero_stage, cfg.parallel.bucket_mb)


STRATEGIES: dict[str, Maker] = {
    "data": _data, "pipeline": _pipeline, "tensor": _tensor, "columns": _columns,
    "local-sgd": _local_sgd, "ps-sync": _parameter_server, "ps-async": _parameter_server, "zero": _zero,
}  # fmt: skip


def make_strategy(
    cfg: Config,
    layout: Layout,
    world: World,
    model: nn.Module,
    feature_shape: tuple[int, ...],
    model_state: dict[str, torch.Tensor] | None = None,
    objective: Objective | None = None,
    device: torch.device = CPU,
) -> Strategy:
    """The strategy of `layout.mode` wrapping `model` (built identically on every rank, checked by the layout).

    `feature_shape` (one sample's) lets pipeline mode time its layers (`parallel.balance = "time"`);
    a meta-device `model` is allocated stage by stage, from `model_state` (a checkpoint's) if given;
    `objective` is the run's task and loss (classification with cross-entropy if not given); `device` is where
    this rank's part lives (`hpcdl.device.run_device`): an allocated model moves there before it is split.
    """
    if not is_meta(model):
        model.to(device)
    strategy = STRATEGIES[layout.mode](cfg, layout, world, model, tuple(feature_shape), model_state, device)
    strategy.device = device
    if objective is not None:
        strategy.objective = objective
    strategy.precision = cfg.train.precision
    return strategy
