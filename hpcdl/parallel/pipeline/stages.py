"""Where a Sequential model is cut into pipeline stages: at named layers, or balanced by parameters or time.

Works on the model's shapes alone (a meta-device model is never allocated here, except
one layer at a time when timing), so every rank can agree on the cut before any rank
allocates its own stage.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.errors import ConfigError
from hpcdl.models import is_meta, materialize
from hpcdl.parallel.layout import has_params


def units(layers: list[nn.Module]) -> list[int]:
    """Where a stage may begin: at each layer with parameters but the first (so a ReLU stays with its Linear)."""
    return [0, *[i for i, layer in enumerate(layers) if has_params(layer)][1:]]


def balanced_starts(weights: list[float], candidates: list[int], stages: int) -> list[int]:
    """Stage start indices (from `candidates`) that minimise the heaviest stage's total weight."""
    n = len(weights)
    bounds = [*candidates, n]
    unit_weight = [sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])]
    k = len(unit_weight)
    prefix = np.concatenate(([0.0], np.cumsum(unit_weight)))
    # best[s][j]: the lightest possible heaviest stage when the first j units form s stages.
    best = np.full((stages + 1, k + 1), np.inf)
    choice = np.zeros((stages + 1, k + 1), dtype=int)
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, k + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], prefix[j] - prefix[i])
                if cost < best[s][j]:
                    best[s][j], choice[s][j] = cost, i
    starts, j = [], k
    for s in range(stages, 0, -1):
        j = choice[s][j]
        starts.append(candidates[j])
    return starts[::-1]


def layer_times(layers: list[nn.Module], sample: torch.Tensor, repeats: int = 5) -> list[float]:
    """Median seconds of forward plus backward of each layer on `sample` (one micro-batch).

    Meta-device layers are timed on an allocated copy (any initial values time the same).
    """
    layers = [_allocated_copy(i, layer) if is_meta(layer) else layer for i, layer in enumerate(layers)]
    times = np.zeros((repeats, len(layers)))
    for r in range(repeats + 1):
        x = sample
        for i, layer in enumerate(layers):
            x = x.detach().requires_grad_(x.is_floating_point())
            began = time.perf_counter()
            out = layer(x)
            out.backward(torch.ones_like(out))
            if r:  # the first round warms up
                times[r - 1, i] = time.perf_counter() - began
            x = out
        for layer in layers:
            layer.zero_grad(set_to_none=True)
    return list(np.median(times, axis=0))


def _allocated_copy(index: int, layer: nn.Module) -> nn.Module:
    copied = copy.deepcopy(layer)
    materialize([(index, copied)], seed=0)
    return copied


def stage_starts(
    layers: list[nn.Module], stages: int, balance: str, cuts: list[int] | None, world: World, sample=None
) -> list[int]:
    """Where each stage begins: the named cut points, or balanced by parameters or measured time."""
    if cuts:
        return [0, *cuts]
    candidates = units(layers)  # at least `stages` of them, as Layout.check_stages made sure
    if balance == "time":
        if sample is None:
            raise ConfigError("parallel.balance = 'time' needs a sample batch to time the layers on")
        # Timed on rank 0 only, then shared: every rank must cut at the same places.
        weights = world.bcast(layer_times(layers, sample) if world.rank == 0 else None, root=0)
    else:
        weights = [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
    return balanced_starts(weights, candidates, stages)
