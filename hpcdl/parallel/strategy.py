"""The seam between the training loop and every way of splitting the work.

The loop (hpcdl/train.py) knows a strategy only through `Strategy`: where its model lives,
which rows and columns of the data this rank reads, one step returning a `StepResult`,
evaluation, the unsplit model and optimizer state for checkpoints, and the bytes it
communicates per step. A new way of splitting is one new class implementing it (see
docs/architecture.md, "How to add a strategy").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.metrics import PhaseTimer


@dataclass(frozen=True)
class StepResult:
    """What one rank counted in one step: summed loss, correct predictions, samples (zeros if it does not count)."""

    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0

    def vector(self) -> np.ndarray:
        """The three figures as a float64 vector, ready to be summed over steps and ranks."""
        return np.array([self.loss_sum, self.correct, self.samples], dtype=np.float64)


class Strategy(ABC):
    """One way of splitting a model's training over ranks. Subclasses set the members in `__init__`:

    - `params`: the parameters this rank optimises; `param_names`: their names, for messages;
    - `share`: the `DataShare` this rank reads;
    - `replicated`: True when every rank holds the whole model (replicas can be compared bitwise).
    """

    device = torch.device("cpu")  # where this rank's part of the model lives and batches go
    params: list[nn.Parameter]
    param_names: list[str]
    share: DataShare
    replicated: bool = False

    @abstractmethod
    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """Forward and backward of this rank's share; with `sync`, gradients are final (summed) on return.

        `scale` multiplies the loss (1/k when k global batches are accumulated before a step).
        """

    @abstractmethod
    def evaluate_batch(self, batch: Batch) -> StepResult:
        """The same figures as `train_step`, without learning."""

    @abstractmethod
    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole unsplit model's state, complete on rank 0 (what checkpoints hold)."""

    @property
    def bytes_per_sync(self) -> int:
        """Bytes this rank communicates for gradients per optimizer step (for scaling studies)."""
        return 0

    def zero_grad(self) -> None:
        """Zero this rank's gradients in place for the next step."""
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: B027 - optional, no-op by default
        """Make replicas' optimizer state equal (after a fresh start or a resume); nothing by default."""

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state keyed as for the unsplit model, complete on rank 0."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore this rank's part of a state saved by `optimizer_state` (in any layout)."""
        optimizer.load_state_dict(state)


def named_params(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """The names of `params` in `model` (positions for any the model does not name)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names.get(id(p), f"parameter #{i}") for i, p in enumerate(params)]
