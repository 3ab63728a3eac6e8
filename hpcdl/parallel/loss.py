"""What every strategy's step shares: the task's loss of a rank's share of a global batch, and its figures.

An `Objective` is the task (classification or regression) and its loss: built-in
(`cross_entropy`, `mse`, `l1`, `huber`) or the user's own. A loss must be the MEAN over the
samples of a per-sample loss (as torch's losses are by default): a rank's share is then that
mean over its rows times rows / global rows, and the shares summed over ranks (the gradient
Allreduce) are exactly the global batch's mean, however the batch was split.

Figures are sums (float64), summed over steps and ranks before any division, so every metric is
exact at any rank count: classification counts correct predictions (accuracy); regression sums
squared and absolute errors and the targets' sum and sum of squares (RMSE, MAE and R^2 over all
target elements).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcdl.data.loader import Batch
from hpcdl.errors import ConfigError
from hpcdl.models import load_factory

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BUILT_IN_LOSSES: dict[str, tuple[str, LossFn]] = {  # name -> (task it fits, mean loss)
    "cross_entropy": ("classification", F.cross_entropy),
    "mse": ("regression", F.mse_loss),
    "l1": ("regression", F.l1_loss),
    "huber": ("regression", F.huber_loss),
}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse"}
TASKS = tuple(DEFAULT_LOSS)


@dataclass(frozen=True)
class StepResult:
    """What one rank counted in one step: summed loss, samples and the task's sums (all zero if it does not count)."""

    loss_sum: float = 0.0
    samples: int = 0
    figures: tuple[float, ...] = ()  # the objective's sums, e.g. (correct,) for classification

    def vector(self, width: int = 3) -> np.ndarray:
        """[summed loss, *figures, samples] as float64, `width` long (zeros where nothing was counted), to be
        summed over steps and ranks; the default is classification's [loss, correct, samples]."""
        out = np.zeros(width, dtype=np.float64)
        out[0], out[-1] = self.loss_sum, self.samples
        out[1 : 1 + len(self.figures)] = self.figures
        return out

    @classmethod
    def from_vector(cls, sums: np.ndarray) -> StepResult:
        """The inverse of `vector`: a result holding summed figures."""
        return cls(float(sums[0]), int(sums[-1]), tuple(float(v) for v in sums[1:-1]))


@dataclass(frozen=True)
class Objective:
    """The task, its mean loss over samples, and the shape each sample's target has (regression)."""

    task: str = "classification"
    loss_fn: LossFn = F.cross_entropy
    target_shape: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """Length of a StepResult's vector: loss sum, samples and the task's figures."""
        return 3 if self.task == "classification" else 7

    def outputs_as_targets(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model's (n, outputs) as the targets' (n, *target_shape) for regression; logits as they are."""
        if self.task == "classification":
            return outputs
        return outputs.reshape(len(outputs), *self.target_shape)

    def share_of_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """This rank's part of the global batch's mean loss: its rows' mean times rows / global rows.

        Summing these parts over ranks (an Allreduce with SUM of their gradients) gives exactly
        the gradient of the mean loss over the whole global batch.
        """
        mean = self.loss_fn(self.outputs_as_targets(outputs), batch.y)
        return mean * (len(batch.y) / batch.global_count)

    def counted(self, outputs: torch.Tensor, targets: torch.Tensor, loss_sum: float) -> StepResult:
        """The figures of one share: its summed loss, its size and the task's sums."""
        outputs = self.outputs_as_targets(outputs.detach())
        if self.task == "classification":
            figures = (float((outputs.argmax(dim=1) == targets).sum()),)
        else:
            error = (outputs - targets).double()
            values = targets.double()
            figures = (
                float((error**2).sum()), float(error.abs().sum()), float(values.sum()), float((values**2).sum()),
                float(targets.numel()),
            )  # fmt: skip
        return StepResult(loss_sum, len(targets), figures)

    def evaluated(self, outputs: torch.Tensor, targets: torch.Tensor) -> StepResult:
        """The figures of outputs computed without learning (their loss summed over the samples)."""
        loss_sum = self.loss_fn(self.outputs_as_targets(outputs), targets).item() * len(targets)
        return self.counted(outputs, targets, loss_sum)

    @torch.no_grad()
    def evaluate_batch(self, model: nn.Module, batch: Batch) -> StepResult:
        """The figures of a rank's share of a batch, without learning."""
        return self.evaluated(model(batch.x), batch.y) if len(batch.y) else StepResult()

    def metric_names(self) -> list[str]:
        """The keys `metrics` gives, for training and validation."""
        names = ["loss", "acc"] if self.task == "classification" else ["loss", "rmse", "mae", "r2"]
        return [*names, *(f"val_{name}" for name in names)]

    def metrics(self, sums: np.ndarray, prefix: str = "") -> dict[str, float]:
        """Loss and the task's metrics from a vector of sums over steps and ranks (`prefix` e.g. "val_")."""
        loss_sum, *figures, samples = (float(v) for v in sums)
        out = {f"{prefix}loss": loss_sum / max(samples, 1)}
        if self.task == "classification":
            out[f"{prefix}acc"] = figures[0] / max(samples, 1)
            return out
        squared, absolute, total, total_sq, elements = figures
        spread = total_sq - total**2 / max(elements, 1)  # the targets' sum of squared deviations
        out[f"{prefix}rmse"] = math.sqrt(squared / max(elements, 1))
        out[f"{prefix}mae"] = absolute / max(elements, 1)
        out[f"{prefix}r2"] = 1.0 - squared / spread if spread > 0 else 0.0
        return out


CLASSIFICATION = Objective()


def make_objective(
    task: str, loss: str = "", target_shape: tuple[int, ...] = (), folder: str = "", loss_fn: LossFn | None = None
) -> Objective:
    """The objective of a dataset's task with `train.loss` (a built-in name, "" for the task's default, or
    "module:function"), or the user's own `loss_fn` (hpcdl.fit's argument), which wins."""
    if task not in TASKS:
        raise ConfigError(f"the data's task {task!r} is not one of {', '.join(TASKS)}")
    if loss_fn is not None:
        if not callable(loss_fn):
            kind = type(loss_fn).__name__
            raise ConfigError(f"loss_fn must be a function (outputs, targets) -> mean loss, got {kind}")
        return Objective(task, loss_fn, tuple(target_shape))
    name = loss or DEFAULT_LOSS[task]
    if ":" in name:
        return Objective(task, load_factory(name, folder, "train.loss"), tuple(target_shape))
    fits, function = BUILT_IN_LOSSES[name]
    if fits != task:
        suited = ", ".join(n for n, (t, _) in BUILT_IN_LOSSES.items() if t == task)
        raise ConfigError(
            f"train.loss = {name!r} is for {fits}, but the data is a {task} set; use {suited}, or your own "
            "as 'module:function'"
        )
    return Objective(task, function, tuple(target_shape))


def zero_contribution(model: nn.Module) -> torch.Tensor:
    """A loss of exactly zero that still reaches every parameter, for a rank with an empty share.

    Backward through it gives zero gradients everywhere, so gradient hooks fire and
    the rank joins its collectives like every other rank.
    """
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
