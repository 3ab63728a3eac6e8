"""The seam between the training loop and every way of splitting the work.

The loop (hpcdl/train.py) knows a strategy only through `Strategy`: where its model lives,
which rows and columns of the data this rank reads, one step returning a `StepResult`,
evaluation, the unsplit model and optimizer state for checkpoints, and the bytes it
communicates per step. A new way of splitting is one new class implementing it (see
docs/architecture.md, "How to add a strategy").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.loss import CLASSIFICATION, Objective, StepResult, zero_contribution
from hpcdl.precision import autocast

__all__ = ["Strategy", "StepResult", "forward_backward", "named_params"]


class Strategy(ABC):
    """One way of splitting a model's training over ranks. Subclasses set the members in `__init__`:

    - `params`: the parameters this rank optimises; `param_names`: their names, for messages;
    - `share`: the `DataShare` this rank reads;
    - `replicated`: True when every rank holds the whole model (replicas can be compared bitwise).
    """

    device = torch.device("cpu")  # where this rank's part of the model lives and batches go
    objective: Objective = CLASSIFICATION  # the task's loss and figures (make_strategy sets the run's)
    params: list[nn.Parameter]
    param_names: list[str]
    share: DataShare
    replicated: bool = False
    split_group: World | None = None  # ranks holding disjoint parts of the model: their gradients' squares add up
    precision: str = "fp32"  # train.precision: forward passes run under `autocast()` (make_strategy sets it)

    def autocast(self) -> AbstractContextManager:
        """The context of every forward pass: torch.autocast in bf16/fp16, nothing for fp32."""
        return autocast(self.device, self.precision)

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

    def split_param_ids(self) -> set[int]:
        """Indices into `params` of those split over `split_group`; the others are whole and equal on its ranks."""
        return set()

    def prune_weights(self) -> list[tuple[torch.Tensor, bool]]:
        """This rank's weights that magnitude pruning may zero (hpcdl.compress.prune): the parameters of two or more
        dimensions (Linear and Conv weights), each with True when it is a block of a tensor split over `split_group`
        (its elements are counted on every rank of the group), False when it is whole and the same on every rank of
        the group (counted once). Replicas hold the same weights, so each replica group finds the same threshold."""
        split = self.split_param_ids()
        return [(p, index in split) for index, p in enumerate(self.params) if p.dim() >= 2]

    def grad_norm(self) -> float:
        """The L2 norm of the whole model's summed gradient, the same on every rank.

        Parts of a split model (pipeline stages, tensor or column shards) add their squares in one
        small Allreduce over `split_group`; parameters every rank holds whole count once.
        """
        split = self.split_param_ids()
        squares = np.zeros(2)  # [split parts, whole parameters]
        for index, param in enumerate(self.params):
            if param.grad is not None:
                squares[0 if index in split else 1] += float(param.grad.detach().double().pow(2).sum())
        if self.split_group is not None and self.split_group.size > 1:
            squares[:1] = self.split_group.allreduce_sum(squares[:1])
        return math.sqrt(squares.sum())

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale the gradients so that their whole-model norm is at most `max_norm`; returns the norm before.

        As torch.nn.utils.clip_grad_norm_ does on one process: factor max_norm / (norm + 1e-6), if below 1.
        """
        norm = self.grad_norm()
        factor = max_norm / (norm + 1e-6)
        if factor < 1.0:
            for param in self.params:
                if param.grad is not None:
                    param.grad.mul_(factor)
        return norm

    def optimizer_step(self, optimizer: torch.optim.Optimizer, timer: PhaseTimer) -> None:
        """Apply the step's final gradients: the optimizer's step and what the layout does around it
        (parameter servers push and pull, local SGD averages)."""
        with timer.phase("optimizer"):
            optimizer.step()

    def local_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """What only a resume on the same ranks needs beyond the unsplit model and optimizer (every rank's own
        weights while they differ), complete on rank 0; None when nothing (a collective)."""
        return None

    def load_local_state(self, optimizer: torch.optim.Optimizer, state: dict | None) -> None:  # noqa: B027
        """Restore this rank's part of `local_state`, when the checkpoint holds one for this world size."""

    def summary(self) -> dict:
        """The strategy's own figures for the run summary, the same on every rank (a collective)."""
        return {}

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


def forward_backward(strategy: Strategy, model: nn.Module, batch: Batch, timer: PhaseTimer, scale: float) -> StepResult:
    """Forward and backward of the whole `model` on this rank's rows, the loss multiplied by `scale`.

    Shared by the strategies whose ranks each run the whole model (data parallel, ZeRO, parameter servers' workers);
    what happens to the gradients during and after backward (hooks, no_sync, the exchange) stays with each.
    A rank with no rows backpropagates a zero loss, so that its hooks fire as its peers' do.
    """
    model.train()
    with timer.phase("forward"):
        if len(batch.y):
            with strategy.autocast():
                outputs = model(batch.x)
                loss = strategy.objective.share_of_loss(outputs, batch)
            result = strategy.objective.counted(outputs, batch.y, loss.item() * batch.global_count)
        else:
            loss, result = zero_contribution(model), StepResult()
    with timer.phase("backward"):
        (loss * scale if scale != 1.0 else loss).backward()
    return result
