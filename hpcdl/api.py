"""hpcdl from your own script: the world, a data-parallel wrapper for your model, and `fit`.

Everything here is a thin layer over the modules the command line uses (comm,
parallel.data, train): one engine, two ways in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from hpcdl.comm import World, init
from hpcdl.config import ABOVE_ZERO, COMPRESSIONS, Config, check_choice, check_flag, check_number, check_path
from hpcdl.errors import ConfigError
from hpcdl.parallel.data import broadcast_module
from hpcdl.parallel.grad_sync import GradSync


class DataParallel(nn.Module):
    """Your model on every rank, its gradients averaged over ranks by hpcdl's bucketed Allreduce engine.

    Rank 0's parameters are broadcast at construction. During `loss.backward()` each bucket's
    non-blocking Allreduce starts as soon as its gradients are final; when `backward()` returns,
    every `.grad` holds the average over ranks (the sum with `average=False`), so the
    optimizer step that follows is the same on every rank. Inside `with model.no_sync():`
    backward only accumulates locally (gradient accumulation); the next backward outside
    it communicates the accumulated sum. `compression` is "none", "fp16" or "bf16".
    Parameters of any floating dtype (float64, float32, float16, bfloat16, mixed) are summed
    in their own dtype's buckets.
    """

    def __init__(
        self,
        module: nn.Module,
        bucket_mb: float = 25.0,
        compression: str = "none",
        overlap: bool = True,
        average: bool = True,
        world: World | None = None,
    ):
        super().__init__()
        world = world or init()
        # Before the broadcast below: a bad argument (the same on every rank) ends every rank with one line.
        world.agree(lambda: _check_data_parallel_arguments(module, bucket_mb, compression, overlap, average))
        self.module = module
        self.world = world
        params = [p for p in module.parameters() if p.requires_grad]
        broadcast_module(self.world, module)
        scale = 1.0 / self.world.size if average else 1.0
        self.grads = GradSync(self.world, params, int(bucket_mb * 2**20), compression, overlap=overlap, scale=scale)
        self._finish_queued = False
        # Registered after the engine's hooks: the sync point is queued once per backward().
        for p in params:
            p.register_post_accumulate_grad_hook(self._queue_finish)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module."""
        return self.module(*args, **kwargs)

    def _queue_finish(self, param: nn.Parameter) -> None:
        if not self._finish_queued:
            self._finish_queued = True
            # Runs once when this backward() ends: the sync point, as in DDP.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        self._finish_queued = False
        if self.grads.sync_enabled:
            self.grads.finish()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this block only accumulates gradients locally (no communication)."""
        with self.grads.no_sync():
            yield


def _check_data_parallel_arguments(module: Any, bucket_mb: Any, compression: Any, overlap: Any, average: Any) -> None:
    """hpcdl.DataParallel's arguments: a ConfigError naming the first one that is wrong."""
    _check_module("hpcdl.DataParallel: module", module)
    check_number("hpcdl.DataParallel: bucket_mb", bucket_mb, ABOVE_ZERO)
    check_choice("hpcdl.DataParallel: compression", compression, COMPRESSIONS)
    check_flag("hpcdl.DataParallel: overlap", overlap)
    check_flag("hpcdl.DataParallel: average", average)


def _check_module(name: str, value: Any) -> None:
    if not isinstance(value, nn.Module):
        raise ConfigError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def _option_keys() -> dict[str, tuple[str, str]]:
    """fit's keyword names -> (section, key): every `section_key`, and `key` alone where unambiguous."""
    from hpcdl.config import SECTIONS

    names: dict[str, list[tuple[str, str]]] = {}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), section)):
            names.setdefault(f.name, []).append((section, f.name))
            names[f"{section}_{f.name}"] = [(section, f.name)]
    return {name: where[0] for name, where in names.items() if len(where) == 1}


def _checked_fit_config(model: Any, data_path: Any, config: str | None, options: dict[str, Any]):
    """fit's arguments checked (model, data_path, then the options as config keys), and the Config they make."""
    _check_module("hpcdl.fit: model", model)
    check_path("hpcdl.fit: data_path", data_path)
    return fit_config(data_path, config, **options)


def fit_config(data_path: str | Path, config: str | None = None, **options: Any):
    """The Config `fit` trains with: a named config or TOML file (or defaults), the data path and options."""
    from hpcdl import config as configs

    base = configs.load(config) if config else configs.Config()
    tree = base.to_dict()
    keys = _option_keys()
    for name, value in options.items():
        if name not in keys:
            raise ConfigError(
                f"hpcdl.fit: unknown option {name!r} (options are config keys, e.g. epochs, batch_size, lr, "
                "run_dir, bucket_mb; see README's config table)"
            )
        section, key = keys[name]
        tree[section][key] = value
    tree["data"]["path"] = str(data_path)
    return configs.from_dict(tree, base.source or "hpcdl.fit", base.folder)


def fit(
    model: nn.Module,
    data_path: str | Path,
    *,
    config: str | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    callbacks: Sequence[Any] = (),
    **options: Any,
) -> dict[str, Any]:
    """Train your `model` on an hpcdl HDF5 file with the command line's loop; returns the run's summary.

    Options are config keys by name (`epochs=5, batch_size=128, lr=0.05, optimizer="adam", schedule="cosine",
    clip_grad_norm=1.0, loss="huber", run_dir="runs/mine"`, or `section_key` such as `train_seed`); `config`
    starts from a named config or TOML file. Your own parts: `loss_fn(outputs, targets)` returning the MEAN
    loss over the samples; `optimizer=` a function of the parameters to optimise returning a torch optimizer
    (instead of a name); `scheduler=` a function of the optimizer returning a torch LR scheduler (stepped per
    optimizer step); `callbacks`, objects with `on_step_end(record)` (every `log_every` steps) and/or
    `on_epoch_end(record)`. Same loop, checkpoints, logs and summary as `hpcdl train`; `resume="latest"`
    continues from the run's newest checkpoint, `overwrite=True` moves an old run in the folder aside.
    """
    from hpcdl.train import UserParts, train

    optimizer = options.get("optimizer")
    make_optimizer = options.pop("optimizer") if callable(optimizer) else None
    world = init()
    cfg = world.agree(lambda: _checked_fit_config(model, data_path, config, options))
    world.agree(lambda: _check_parts(model, cfg, make_optimizer, scheduler, callbacks))
    parts = UserParts(loss_fn, make_optimizer, scheduler, tuple(callbacks))
    return train(cfg, world, resume=resume, model=model, overwrite=overwrite, parts=parts)


def _check_parts(model: nn.Module, cfg: Config, make_optimizer: Any, scheduler: Any, callbacks: Any) -> None:
    """fit's own parts are of the kinds it takes, each refusal one line: the optimizer and scheduler functions
    are tried on the model's parameters, so that what they make is known before the run folder is."""
    from hpcdl.train import build_optimizer

    if scheduler is not None and not callable(scheduler):
        raise ConfigError(f"hpcdl.fit: scheduler must be a function of the optimizer, got {type(scheduler).__name__}")
    if isinstance(callbacks, str | bytes) or not isinstance(callbacks, Sequence):
        raise ConfigError(f"hpcdl.fit: callbacks must be a list of objects, got {type(callbacks).__name__}")
    for callback in callbacks:
        if not any(callable(getattr(callback, hook, None)) for hook in ("on_step_end", "on_epoch_end")):
            raise ConfigError(
                f"hpcdl.fit: callback {callback!r} has neither on_step_end(record) nor on_epoch_end(record)"
            )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            f"hpcdl.fit: model {type(model).__name__} has no parameters that require gradients: nothing to train; "
            "pass the network with its layers (e.g. nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))"
        )
    if make_optimizer is None:
        optimizer = build_optimizer(cfg.train, params)
    else:
        optimizer = _made_by("optimizer", "the parameters", make_optimizer, params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"hpcdl.fit: optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
    if scheduler is not None:
        made = _made_by("scheduler", "the optimizer", scheduler, optimizer)
        # hpcdl steps the schedule once per optimizer step, with no metric: ReduceLROnPlateau needs one.
        if not isinstance(made, LRScheduler) or isinstance(made, ReduceLROnPlateau):
            raise ConfigError(
                "hpcdl.fit: scheduler must return a torch LR scheduler stepped without a metric "
                f"(torch.optim.lr_scheduler, not ReduceLROnPlateau), got {type(made).__name__}"
            )


def _made_by(name: str, given: str, factory: Callable[[Any], Any], argument: Any) -> Any:
    """What fit's `name` function makes of `argument`; one line naming it if it raises."""
    try:
        return factory(argument)
    except Exception as exc:  # noqa: BLE001 - the user's function: any failure is theirs to see in one line
        raise ConfigError(f"hpcdl.fit: {name}({given}) raised {type(exc).__name__}: {exc}") from exc
