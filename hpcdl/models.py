"""The model families users start from (MLP, CNN, RNN), built by name from a config."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hpcdl.config import ModelConfig


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


def build(cfg: ModelConfig, feature_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build the named model with the dataset's shapes; the seed makes every rank's copy equal."""
    torch.manual_seed(seed)
    return MODELS[cfg.name](cfg, tuple(feature_shape), num_classes)
