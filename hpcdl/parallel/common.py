"""What every strategy's step shares: the loss of a rank's share of a global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcdl.data.loader import Batch


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


@torch.no_grad()
def evaluate_batch(model: nn.Module, batch: Batch) -> tuple[float, int, int]:
    """(summed loss, correct predictions, samples) of a rank's share of a batch."""
    if len(batch.y) == 0:
        return 0.0, 0, 0
    logits = model(batch.x)
    loss = F.cross_entropy(logits, batch.y, reduction="sum").item()
    return loss, int((logits.argmax(dim=1) == batch.y).sum()), len(batch.y)
