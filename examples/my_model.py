"""Your own model for hpcdl: a factory function called with the dataset's shapes.

hpcdl calls `factory(feature_shape, num_classes, **kwargs)`, where feature_shape is one
sample's shape (e.g. (64,) or (1, 28, 28)) and kwargs is the config's `[model] kwargs`
table, and expects a torch.nn.Module mapping a batch (n, *feature_shape) to logits
(n, num_classes). Name it in a config as `[model] factory = "my_model:mlp"`.
"""

import math

from torch import nn


def mlp(feature_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (128,)) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden size, then a Linear to the class logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(feature_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
