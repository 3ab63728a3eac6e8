"""hpcdl from your own script: the world, a data-parallel wrapper for your model, and `fit`.

Everything here is a thin layer over the modules the command line uses (comm,
parallel.data, train): one engine, two ways in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcdl import comm
from hpcdl.comm import World
from hpcdl.errors import ConfigError
from hpcdl.parallel import data as data_parallel

_world: World | None = None


def init(verbose: bool = False, threads: int | None = None) -> World:
    """Start MPI once and return this rank's World; an uncaught exception on any rank then ends every rank.

    The World has `rank`, `size`, `local_rank`, `local_size`, `node`, `num_nodes`, `comm`
    (the mpi4py communicator), `split(color)` for sub-communicators, `log(message)` (rank 0
    speaks) and `agree(fn)` (run fn everywhere; if it fails anywhere, every rank exits with
    its message). Later calls return the same World; the first call's arguments count.
    """
    global _world
    if _world is None:
        _world = comm.init(verbose=verbose, threads=threads)
    return _world


class DataParallel(nn.Module):
    """Your model on every rank, its gradients averaged over ranks by hpcdl's bucketed Allreduce engine.

    Rank 0's parameters are broadcast at construction. During `loss.backward()` each bucket's
    non-blocking Allreduce starts as soon as its gradients are final; when `backward()` returns,
    every `.grad` holds the average over ranks (the sum with `average=False`), so the
    optimizer step that follows is the same on every rank. Inside `with model.no_sync():`
    backward only accumulates locally (gradient accumulation); the next backward outside
    it communicates the accumulated sum. `compression` is "none", "fp16" or "bf16".
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
        self.module = module
        self.world = world or init()
        self.average = average
        params = [p for p in module.parameters() if p.requires_grad]
        # Registered before the engine's own hooks, so a fresh .grad is back in its bucket first.
        for p in params:
            p.register_post_accumulate_grad_hook(self._keep_in_bucket)
        self.engine = data_parallel.DataParallel(module, self.world, bucket_mb, overlap, compression)
        self._bucket_views = {p: p.grad for p in self.engine.params}
        self._finish_queued = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module."""
        return self.module(*args, **kwargs)

    def _keep_in_bucket(self, param: nn.Parameter) -> None:
        view = self._bucket_views[param]
        if param.grad.data_ptr() != view.data_ptr():
            # zero_grad(set_to_none=True) dropped the view; autograd made a new tensor: move it back.
            view.copy_(param.grad)
            param.grad = view
        if not self._finish_queued:
            self._finish_queued = True
            # Runs once when this backward() ends: the sync point, as in DDP.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        self._finish_queued = False
        if not self.engine.sync_enabled:
            return
        grads = self.engine.grads
        grads.start_all_idle()
        grads.wait()
        if self.average and self.world.size > 1:
            for bucket in grads.buckets:
                bucket.flat.div_(self.world.size)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this block only accumulates gradients locally (no communication)."""
        with self.engine.no_sync():
            yield


def _option_keys(tree: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """fit's keyword names -> (section, key): every `section_key`, and `key` alone where unambiguous."""
    from hpcdl.config import SECTIONS, Config

    names: dict[str, list[tuple[str, str]]] = {}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), section)):
            names.setdefault(f.name, []).append((section, f.name))
            names[f"{section}_{f.name}"] = [(section, f.name)]
    return {name: where[0] for name, where in names.items() if len(where) == 1}


def fit_config(data_path: str | Path, config: str | None = None, **options: Any):
    """The Config `fit` trains with: a named config or TOML file (or defaults), the data path and options."""
    from hpcdl import config as configs

    base = configs.load(config) if config else configs.Config()
    tree = base.to_dict()
    keys = _option_keys(tree)
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
    model: nn.Module, data_path: str | Path, *, config: str | None = None, resume: str | None = None, **options: Any
) -> dict[str, Any]:
    """Train your `model` on an hpcdl HDF5 file with the command line's loop; returns the run's summary.

    Options are config keys by name (`epochs=5, batch_size=128, lr=0.05, optimizer="adam",
    run_dir="runs/mine", compression="fp16"`, or `section_key` such as `train_seed`); `config`
    starts from a named config or TOML file. Same loop, checkpoints, logs and summary as
    `hpcdl train`; `resume="latest"` continues from the run's newest checkpoint.
    """
    from hpcdl.train import train

    world = init()
    cfg = world.agree(lambda: fit_config(data_path, config, **options))
    return train(cfg, world, resume=resume, model=model)
