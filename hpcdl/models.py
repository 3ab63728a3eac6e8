"""The model families users start from (MLP, CNN, RNN), built by name from a config."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcdl.config import DTYPES, MODEL_NAMES, ModelConfig
from hpcdl.errors import ConfigError


class MLP(nn.Sequential):
    """Fully connected ReLU network over flattened features."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN(nn.Sequential):
    """Conv-ReLU-pool blocks, then one hidden fully connected layer."""

    def __init__(self, feature_shape: tuple[int, ...], channels: list[int], fc: int, num_classes: int):
        if len(feature_shape) != 3:
            raise ValueError(f"the CNN needs (channels, height, width) samples, got {feature_shape}")
        in_channels, height, width = feature_shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        layers += [nn.Flatten(), nn.Linear(in_channels * height * width, fc), nn.ReLU()]
        layers.append(nn.Linear(fc, num_classes))
        super().__init__(*layers)


class RNN(nn.Module):
    """LSTM or GRU over (time, features) sequences; the last step's state is classified."""

    def __init__(self, feature_shape: tuple[int, ...], cell: str, hidden: int, layers: int, num_classes: int):
        super().__init__()
        if len(feature_shape) != 2:
            raise ValueError(f"the RNN needs (time, features) samples, got {feature_shape}")
        recurrent = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = recurrent(feature_shape[1], hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


Builder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]

MODELS: dict[str, Builder] = {
    "mlp": lambda cfg, shape, classes: MLP(math.prod(shape), cfg.hidden, classes),
    "cnn": lambda cfg, shape, classes: CNN(shape, cfg.channels, cfg.fc, classes),
    "rnn": lambda cfg, shape, classes: RNN(shape, cfg.cell, cfg.rnn_hidden, cfg.rnn_layers, classes),
}
assert tuple(MODELS) == MODEL_NAMES, "config.MODEL_NAMES lists the models built here"
SEQUENTIAL = ("mlp", "cnn")  # built layer by layer, so a pipeline stage can build only its own


def load_factory(spec: str, folder: str = "", key: str = "model.factory") -> Callable[..., Any]:
    """The function named by 'package.module:function' (config key `key`), looked for on sys.path, then in `folder`."""
    module_name, _, function_name = spec.partition(":")
    if folder and folder not in sys.path:
        # Appended, not prepended: a module on PYTHONPATH wins over one next to the config.
        sys.path.append(folder)
    where = f"PYTHONPATH or the config's folder {folder}" if folder else "PYTHONPATH (or the current folder)"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{key} = {spec!r}: cannot import {exc.name!r}; put it on {where}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: report why
        raise ConfigError(f"{key} = {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{key} = {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def from_factory(
    spec: str, feature_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any], folder: str = ""
) -> nn.Module:
    """Call the user's `factory(feature_shape, num_classes, **kwargs)` and check it returns an nn.Module.

    The factory's signature: `feature_shape` is one sample's shape, e.g. (64,) or (1, 28, 28);
    `num_classes` the number of outputs (the classes; for a regression set, the elements of one
    sample's target); `kwargs` the `[model] kwargs` table. It returns a `torch.nn.Module` mapping a
    batch (n, *feature_shape) to (n, num_classes): logits, or the flattened predicted targets.
    """
    factory = load_factory(spec, folder)
    try:
        model = factory(tuple(feature_shape), num_classes, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code failed: name it and the cause
        raise ConfigError(f"model.factory = {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory = {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def layer_seed(seed: int, index: int) -> int:
    """The seed that initialises layer `index` of a Sequential built with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def materialize(layers: Iterable[tuple[int, nn.Module]], seed: int) -> None:
    """Allocate meta-device layers on the CPU, layer i initialised from `layer_seed(seed, i)`.

    Seeding each layer on its own makes a pipeline stage built alone equal to its part
    of the whole model; the caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        for index, layer in layers:
            layer.to_empty(device="cpu")
            torch.manual_seed(layer_seed(seed, index))
            for module in layer.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()


def is_meta(model: nn.Module) -> bool:
    """Whether `model` was built on the meta device (shapes only, nothing allocated)."""
    return any(p.is_meta for p in model.parameters())


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `model.dtype` name (float32, float64, bfloat16, float16)."""
    assert name in DTYPES, name
    return getattr(torch, name)


def build(
    cfg: ModelConfig,
    feature_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    folder: str = "",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build the named model (or `cfg.factory`'s) with the dataset's shapes; the seed makes every rank's copy equal.

    The MLP and CNN are built layer by layer from `seed` (see `materialize`), in `dtype`; with
    `device="meta"` they come back unallocated, for a pipeline stage to allocate only
    its own layers. A factory's model is built as the factory writes it (its own dtypes);
    the RNN is built whole, on the CPU.
    """
    torch.manual_seed(seed)
    if cfg.factory:
        return from_factory(cfg.factory, tuple(feature_shape), num_classes, cfg.kwargs, folder)
    if cfg.name not in SEQUENTIAL:
        return MODELS[cfg.name](cfg, tuple(feature_shape), num_classes).to(dtype)
    with torch.device("meta"):
        model = MODELS[cfg.name](cfg, tuple(feature_shape), num_classes).to(dtype)
    if device != "meta":
        materialize(enumerate(model), seed)
    return model
