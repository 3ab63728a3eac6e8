"""What every strategy's step shares: the loss of a rank's share of a global batch, and its figures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcdl.data.loader import Batch
from hpcdl.parallel.strategy import StepResult


def share_of_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """This rank's part of the global batch's mean loss: summed here, divided by the global count.

    Summing these parts over ranks (an Allreduce with SUM of their gradients) gives
    exactly the gradient of the mean loss over the whole global batch, whatever the
    number of ranks or how unevenly the batch was split.
    """
    return F.cross_entropy(logits, batch.y, reduction="sum") / batch.global_count


def zero_contribution(model: nn.Module) -> torch.Tensor:
    """A loss of exactly zero that still reaches every parameter, for a rank with an empty share.

    Backward through it gives zero gradients everywhere, so gradient hooks fire and
    the rank joins its collectives like every other rank.
    """
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def counted(logits: torch.Tensor, labels: torch.Tensor, loss_sum: float) -> StepResult:
    """The figures of one share: its summed loss, its correct predictions and its size."""
    return StepResult(loss_sum, int((logits.detach().argmax(dim=1) == labels).sum()), len(labels))


@torch.no_grad()
def evaluate_batch(model: nn.Module, batch: Batch) -> StepResult:
    """The figures of a rank's share of a batch, without learning."""
    if len(batch.y) == 0:
        return StepResult()
    logits = model(batch.x)
    return counted(logits, batch.y, F.cross_entropy(logits, batch.y, reduction="sum").item())
