"""A model whose layers are of two dtypes (float64 then float32), as a user's factory would write it."""

import torch
from torch import nn


class ToDtype(nn.Module):
    """Casts activations between layers of different dtypes."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def mixed(feature_shape: tuple[int, ...], num_classes: int, hidden: int = 16) -> nn.Module:
    """Linear in float64, then ReLU and the classifier in float32: gradients of both dtypes."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(feature_shape[0], hidden).double(),
        ToDtype(torch.float32),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
