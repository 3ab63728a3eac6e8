"""Magnitude pruning: one global threshold over a model however it is split, gradual pruning during training,
and structured pruning of an MLP's hidden neurons into a physically smaller model.

What is pruned: weights of two or more dimensions (Linear and Conv weights; an RNN's matrices too); biases and
norms never. The threshold is the exact k-th smallest |w| over every such weight of the whole model,
k = round(sparsity x N), found by radix selection on the bits of |w| as a float64 (for non-negative floats the
bit pattern orders as the value): eight small Allreduces, a 256-bin histogram per byte, over `split_group`, the
ranks holding distinct parts (pipeline stages, tensor and column shards); a tensor every rank of that group holds
whole is counted once, and replicas (data parallel, ZeRO, the replica axis of pipeline/tensor) each find the same
threshold from the same weights. No rank ever holds another's weights. Every weight with |w| <= threshold is
pruned: exactly k of them unless other weights tie with the k-th (ties are all pruned).

During training (`[prune]`), masks are recomputed at the ramp's steps (Zhu & Gupta's cubic schedule) and the
masked weights are set to zero after every optimizer step, so that momentum or Adam's moments cannot regrow them.
Once pruning has begun a weight that is exactly zero is a pruned one (a weight that lands on 0.0 joins the mask),
so the mask is a function of the weights: a checkpoint's weights carry it and a resume continues bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.config import PruneConfig
from hpcdl.errors import HpcdlError

__all__ = ["kth_smallest_abs", "global_threshold", "Pruner", "ramp", "resolve", "prune_module", "prune_neurons"]

# prune.start and prune.end "auto": the ramp runs from 20% to 70% of the run's steps (Zhu & Gupta prune over the middle
# of training: the weights settle first, and the pruned model recovers after).
AUTO_RAMP = (0.2, 0.7)
RAMP_UPDATES = 10  # prune.every = 0: mask updates over the ramp

Parts = list[tuple[torch.Tensor, bool]]  # (tensor, split over the group?) as Strategy.prune_weights gives


def _keys(t: torch.Tensor) -> torch.Tensor:
    """|t| as int64 keys ordered as the values: the bits of |t| in float64 (exact from any narrower float, so
    layers of different dtypes, even on different ranks, compare exactly)."""
    return magnitude(t).reshape(-1).view(torch.int64)


def magnitude(t: torch.Tensor) -> torch.Tensor:
    """|t| in float64 (exact), what the threshold is compared with."""
    return t.detach().abs().to(torch.float64)


def _summed(local: np.ndarray, whole: np.ndarray, group: World | None) -> np.ndarray:
    """Counts over the group: split parts added over its ranks, whole tensors once."""
    if group is not None and group.size > 1:
        local = group.allreduce_sum(local)
    return local + whole


def count(parts: Parts, group: World | None, predicate=None) -> int:
    """How many elements of the whole model's `parts` (all, or those `predicate(tensor)` marks), exactly."""
    sums = [np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)]
    for tensor, split in parts:
        sums[0 if split else 1][0] += tensor.numel() if predicate is None else int(predicate(tensor).sum())
    return int(_summed(sums[0], sums[1], group)[0])


def kth_smallest_abs(parts: Parts, k: int, group: World | None = None) -> torch.Tensor:
    """The exact k-th smallest |w| (k from 1) over every element of the whole model's `parts`, as a 0-d tensor of
    float64 (exact); a collective over `group` (eight Allreduces of 256 counts, one per byte of the key)."""
    keys = [(_keys(t), split) for t, split in parts]
    prefix, remaining = 0, k
    for shift in range(56, -8, -8):
        hists = [np.zeros(256, dtype=np.int64), np.zeros(256, dtype=np.int64)]
        narrowed = []
        for key, split in keys:
            key = key[(key >> (shift + 8)) == prefix] if shift < 56 else key
            narrowed.append((key, split))
            hists[0 if split else 1] += torch.bincount((key >> shift) & 255, minlength=256).cpu().numpy()
        keys = narrowed
        cumulative = np.cumsum(_summed(hists[0], hists[1], group))
        digit = int(np.searchsorted(cumulative, remaining))  # the first bin whose running count reaches k
        remaining -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << 8) | digit
    return torch.tensor(prefix, dtype=torch.int64).view(torch.float64)


def global_threshold(parts: Parts, sparsity: float, group: World | None = None) -> tuple[torch.Tensor | None, int]:
    """(threshold, k) for `sparsity` of the whole model's weights: None when k = 0 (nothing to prune)."""
    k = round(sparsity * count(parts, group))
    return (kth_smallest_abs(parts, k, group), k) if k > 0 else (None, 0)


def ramp(cfg: PruneConfig, step: int) -> float:
    """The target sparsity at `step`: s_f + (0 - s_f)(1 - (t - t0)/(n dt))^3 on [start, end], s_f after."""
    if step < cfg.start:
        return 0.0
    if step >= cfg.end:
        return cfg.final_sparsity
    return cfg.final_sparsity * (1.0 - (1.0 - (step - cfg.start) / (cfg.end - cfg.start)) ** 3)


def resolve(cfg: PruneConfig, last_step: int) -> tuple[PruneConfig, str]:
    """The ramp the run follows (an "auto" start or end from AUTO_RAMP of `last_step`, `every` from RAMP_UPDATES
    when 0), and the line that says so at start."""
    auto = "auto" in (cfg.start, cfg.end)
    start = round(AUTO_RAMP[0] * last_step) if cfg.start == "auto" else cfg.start
    end = max(start, round(AUTO_RAMP[1] * last_step)) if cfg.end == "auto" else cfg.end
    if end < start:
        raise HpcdlError(f"prune.end = {end} comes before the ramp's start at step {start}; set prune.end later")
    every = cfg.every or max(1, (end - start) // RAMP_UPDATES)
    ramp_cfg = replace(cfg, start=start, end=end, every=every)
    line = f"prune: sparsity ramped to {cfg.final_sparsity:g} over steps {start} to {end}"
    if auto:
        shares = f"{AUTO_RAMP[0]:.0%} to {AUTO_RAMP[1]:.0%}"
        line += f" ({shares} of the run's {last_step} for 'auto'; prune.start and prune.end choose)"
    line += f", masks updated every {every} steps"
    if start >= last_step:
        raise HpcdlError(
            f"prune.start = {start}: the run ends at step {last_step}, before the ramp begins, so nothing would be "
            "pruned; lower prune.start and prune.end (or set both to 'auto': the ramp spans 20% to 70% of the run)"
        )
    if end > last_step:
        line += f"; the run ends at step {last_step}, before the ramp reaches {cfg.final_sparsity:g}"
    return ramp_cfg, line


def points(cfg: PruneConfig) -> list[int]:
    """The ramp's update steps: start, start + every, ... up to end, and end."""
    return sorted({*range(cfg.start, cfg.end + 1, cfg.every), cfg.end})


@dataclass
class Pruner:
    """Gradual magnitude pruning of a strategy's weights during training (a collective at its update steps)."""

    cfg: PruneConfig
    parts: Parts
    group: World | None
    handled: int  # the last step whose update has been done (updates happen at the first sync at or after a point)
    masks: list[torch.Tensor] | None = None  # True where pruned; None until the first update that prunes
    threshold: float | None = None

    @classmethod
    def for_run(cls, cfg: PruneConfig, strategy, global_step: int, last_step: int) -> tuple[Pruner | None, str]:
        """The run's pruner (None when prune.final_sparsity is 0), at the position a resume starts from, and the
        line that says its ramp."""
        if cfg.final_sparsity <= 0:
            return None, ""
        cfg, line = resolve(cfg, last_step)
        pruner = cls(cfg, strategy.prune_weights(), strategy.split_group, global_step)
        done = [p for p in points(cfg) if p <= global_step]
        if done and round(ramp(cfg, done[-1]) * count(pruner.parts, pruner.group)) > 0:
            pruner.masks = [t == 0 for t, _ in pruner.parts]  # the saved weights carry the masks (see above)
        return pruner, line

    def after_step(self, step: int) -> None:
        """After the optimizer step ending at `step`: a due mask update, then the masked weights set to zero."""
        due = [p for p in points(self.cfg) if self.handled < p <= step]
        self.handled = step
        if due:
            self.update(ramp(self.cfg, due[-1]))
        self.apply()

    def update(self, sparsity: float) -> None:
        """New masks: every weight with |w| <= the global threshold for `sparsity`."""
        threshold, k = global_threshold(self.parts, sparsity, self.group)
        if threshold is not None:
            self.threshold = float(threshold)
            self.masks = [magnitude(t) <= threshold for t, _ in self.parts]

    @torch.no_grad()
    def apply(self) -> None:
        """Masked weights to zero; a weight that landed on exactly zero joins the mask."""
        if self.masks is None:
            return
        for (tensor, _), mask in zip(self.parts, self.masks):
            mask |= tensor == 0
            tensor.masked_fill_(mask, 0.0)

    def summary(self) -> dict:
        """The pruned fraction of the whole model's prunable weights (a collective)."""
        total = count(self.parts, self.group)
        zeros = count(self.parts, self.group, lambda t: t == 0)
        return {
            "prune": {
                "final_sparsity": self.cfg.final_sparsity,
                "ramp_steps": [self.cfg.start, self.cfg.end, self.cfg.every],
                "weights": total,
                "pruned": zeros,
                "sparsity": zeros / total if total else 0.0,
                "threshold": self.threshold,
            }
        }


# -- one process: a saved model pruned after training (`hpcdl prune`)


def prune_module(model: nn.Module, sparsity: float) -> tuple[float | None, int]:
    """Zero the `sparsity` smallest-magnitude weights of `model` (one global threshold); (threshold, k)."""
    parts = [(p, False) for p in model.parameters() if p.dim() >= 2]
    threshold, k = global_threshold(parts, sparsity)
    if threshold is not None:
        with torch.no_grad():
            for p, _ in parts:
                p.masked_fill_(magnitude(p) <= threshold, 0.0)
    return (None if threshold is None else float(threshold)), k


def neuron_norms(layer: nn.Linear, norm: str) -> torch.Tensor:
    """Each output neuron's norm of its incoming weights (L1 or L2)."""
    return layer.weight.detach().abs().sum(1) if norm == "l1" else layer.weight.detach().pow(2).sum(1).sqrt()


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """An MLP's Linear layers in order (hpcdl.models.MLP: Flatten, then Linear-ReLU pairs, then the classifier)."""
    layers = [m for m in model.children() if isinstance(m, nn.Linear)]
    others = [m for m in model.children() if not isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten))]
    if len(layers) < 2 or others:
        raise ValueError("structured pruning needs an MLP (Linear layers with ReLU between them)")
    return layers


def keep_neurons(model: nn.Module, fraction: float, norm: str = "l2") -> list[torch.Tensor]:
    """For each hidden layer, the (sorted) indices of the neurons kept: the largest norms, round((1 - fraction) x
    width) of them, at least one; ties broken by the lower index."""
    kept = []
    for layer in hidden_linears(model)[:-1]:
        norms = neuron_norms(layer, norm)
        n = max(1, layer.out_features - round(fraction * layer.out_features))
        order = sorted(range(len(norms)), key=lambda i: (-float(norms[i]), i))
        kept.append(torch.tensor(sorted(order[:n]), dtype=torch.int64))
    return kept


@torch.no_grad()
def mask_neurons(model: nn.Module, kept: list[torch.Tensor]) -> None:
    """The same model with the dropped neurons' incoming weights and biases set to zero (ReLU(0) = 0: they give 0)."""
    for layer, keep in zip(hidden_linears(model), kept):
        dropped = torch.ones(layer.out_features, dtype=torch.bool)
        dropped[keep] = False
        layer.weight[dropped] = 0.0
        if layer.bias is not None:
            layer.bias[dropped] = 0.0


@torch.no_grad()
def prune_neurons(model: nn.Module, kept: list[torch.Tensor]) -> nn.Module:
    """A physically smaller MLP: each hidden layer keeps only `kept` neurons (rows of its weight and bias, columns
    of the next layer's weight). Its outputs equal those of `mask_neurons(model, kept)`."""
    from hpcdl.models import MLP

    layers = hidden_linears(model)
    hidden = [len(k) for k in kept]
    small = MLP(layers[0].in_features, hidden, layers[-1].out_features).to(layers[0].weight.dtype)
    incoming = None
    for old, new, keep in zip(layers, hidden_linears(small), [*kept, None]):
        weight = old.weight if incoming is None else old.weight[:, incoming]
        new.weight.copy_(weight if keep is None else weight[keep])
        new.bias.copy_(old.bias if keep is None else old.bias[keep])
        incoming = keep
    return small


def sparsity_of(model: nn.Module) -> tuple[int, int]:
    """(zero weights, weights) over the prunable weights of `model`."""
    parts = [p for p in model.parameters() if p.dim() >= 2]
    return sum(int((p == 0).sum()) for p in parts), sum(p.numel() for p in parts)
