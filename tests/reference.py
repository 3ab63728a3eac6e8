"""Plain single-process PyTorch training, the oracle every parallel path is compared against."""

from __future__ import annotations

import math
from collections.abc import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from hpcdl.config import ModelConfig
from hpcdl.models import MLP, build

Builder = Callable[[tuple[int, ...], int, int], torch.nn.Module]  # (feature_shape, num_classes, seed) -> model


def plain_mlp(hidden: list[int]) -> Builder:
    """The MLP as a user's own PyTorch code builds it: torch.manual_seed(seed), then the constructor."""

    def make(feature_shape: tuple[int, ...], num_classes: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return MLP(math.prod(feature_shape), hidden, num_classes)

    return make


def reference_train(
    path,
    model_cfg: ModelConfig | Builder,
    *,
    seed: int,
    batch: int,
    steps: int,
    lr: float,
    momentum: float = 0.9,
    dtype: torch.dtype = torch.float32,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
    clip_grad_norm: float = 0.0,
    autocast: torch.dtype | None = None,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """SGD on the whole global batch in one process; sample order from (seed, epoch) as documented.

    `model_cfg` is a config hpcdl builds the model from (in `dtype`), or a user's own builder
    (`plain_mlp`); the features are fed in `dtype`. A regression file's float targets go to `loss_fn`
    (default cross-entropy) with the outputs in the targets' shape; `scheduler` (torch's own) steps
    once per step; `clip_grad_norm` clips with torch.nn.utils.clip_grad_norm_; `autocast` runs the
    forward under torch.autocast in that dtype; `device` is where it all runs (the state comes back on the CPU).
    """
    with h5py.File(path, "r") as f:
        x, y = torch.from_numpy(f["train/x"][:]).to(dtype), torch.from_numpy(f["train/y"][:])
        regression = f.attrs.get("task", "classification") == "regression"
        outputs = math.prod(y.shape[1:]) if regression else int(f.attrs["num_classes"])
    y = y.float() if regression else y
    shape = tuple(x.shape[1:])
    if callable(model_cfg):
        model = model_cfg(shape, outputs, seed)
    else:
        model = build(model_cfg, shape, outputs, seed, dtype=dtype)
    model, x, y = model.to(device), x.to(device), y.to(device)
    loss_fn = loss_fn or F.cross_entropy
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    schedule = scheduler(optimizer) if scheduler else None
    done, epoch = 0, 0
    while done < steps:
        order = np.random.default_rng([seed, epoch]).permutation(len(y))
        for start in range(0, len(y), batch):
            chunk = torch.from_numpy(order[start : start + batch]).to(device)
            optimizer.zero_grad()
            with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
                out = model(x[chunk])
                out = out.reshape(len(chunk), *y.shape[1:]) if regression else out
                loss = loss_fn(out, y[chunk])
            loss.backward()
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            if schedule:
                schedule.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    return {name: value.cpu() for name, value in model.state_dict().items()}


def assert_close_states(actual: dict, expected: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Every tensor of two state dicts equal within float tolerance, naming the first that is not."""
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )
