"""Column parallel: each rank reads only its block of every sample's features (parallel.mode = "columns").

For samples too wide for one rank. The MLP's first Linear is split by its input columns
(a row-parallel Linear, tensor/layers.py): rank r holds W[:, c0:c1] and reads x[:, c0:c1]
of every sample of the global batch, and one Allreduce sums the partial products into the
whole first layer's output on every rank. From there every rank holds an identical replica
of the rest of the model and sees the whole batch, so the layers after the first compute
identical gradients: they need no gradient exchange at all. The first layer's weight
gradient grad_out^T @ x_r is local; backward through the forward Allreduce is the identity.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.layout import Layout
from hpcdl.parallel.state import gather_model_state, gather_optimizer_state, local_optimizer_state
from hpcdl.parallel.strategy import StepResult, Strategy, named_params
from hpcdl.parallel.tensor.layers import RowParallelLinear, comm_seconds

FIRST_WEIGHT = "1.weight"  # the MLP's first Linear (after Flatten): the one split by columns


class ColumnParallel(Strategy):
    """The MLP's first layer split by input columns over the layout's ranks; the rest replicated."""

    replicated = False  # the first layer's weight differs between ranks

    def __init__(self, model: nn.Module, world: World, layout: Layout):
        self.grid = layout.grid(world)
        self.model, self.world = model, world
        self.first = model[1] = RowParallelLinear(model[1], self.grid.group("column"))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = named_params(model, self.params)
        self.share = DataShare(0, 1, self.first.block)  # every sample of the batch, this rank's columns
        self.first_id = next(i for i, p in enumerate(self.params) if p is self.first.weight)
        self.split_group = self.grid.group("column")

    def split_param_ids(self) -> set[int]:
        """The first weight, cut by columns; every other parameter is whole on every rank."""
        return {self.first_id}

    def _forward(self, batch: Batch, timer: PhaseTimer) -> torch.Tensor:
        comm_seconds(self.model)
        began = time.perf_counter()
        with self.autocast():
            logits = self.model(batch.x)
        spent = comm_seconds(self.model)
        timer.add("forward", time.perf_counter() - began - spent)
        timer.add("comm", spent)
        return logits

    def _counted(self, result: StepResult) -> StepResult:
        # Every rank holds the whole batch; rank 0 alone reports it, so sums over ranks count it once.
        return result if self.world.is_root else StepResult()

    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """Forward (with the partial-product Allreduce) and backward; no gradient exchange is needed."""
        self.model.train()
        logits = self._forward(batch, timer)
        with self.autocast():
            loss = self.objective.share_of_loss(logits, batch)
        with timer.phase("backward"):
            (loss * scale if scale != 1.0 else loss).backward()
        return self._counted(self.objective.counted(logits, batch.y, loss.item() * batch.global_count))

    def evaluate_batch(self, batch: Batch) -> StepResult:
        """The figures of the batch, counted on rank 0 only."""
        self.model.eval()
        with self.autocast():
            return self._counted(self.objective.evaluate_batch(self.model, batch))

    def model_state(self) -> dict[str, torch.Tensor]:
        """The unsplit model's state on rank 0: the first layer's weight joined from every rank's columns."""
        return gather_model_state(self.grid, "column", self.model.state_dict(), {FIRST_WEIGHT: 1})

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state with the first weight's per-parameter tensors joined whole (on rank 0)."""
        ids = list(range(len(self.params)))
        return gather_optimizer_state(self.grid, "column", optimizer.state_dict(), ids, {self.first_id: 1})

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore a whole-model optimizer state, keeping this rank's columns of the first weight."""
        ids, group = list(range(len(self.params))), self.grid.group("column")
        optimizer.load_state_dict(local_optimizer_state(state, ids, {self.first_id: 1}, group.rank, group.size))
