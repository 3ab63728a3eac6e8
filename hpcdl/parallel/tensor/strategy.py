"""Tensor parallel: an MLP's Linear layers split inside themselves, as in Megatron-LM.

A pair of Linear layers becomes a column-parallel layer (each rank computes a block of
the hidden features) then a row-parallel one (each rank multiplies its block by its rows
of the weight, and one Allreduce sums the partial outputs). The only traffic is that
Allreduce in forward and one Allreduce of the input's gradient in backward. With an odd
number of Linear layers, the last one (the classifier) stays whole and replicated: every
tensor rank computes it on the same input. Replicas sum gradients with the data-parallel engine.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.data import DataParallelStrategy
from hpcdl.parallel.layout import Layout, linear_pairs
from hpcdl.parallel.loss import Objective
from hpcdl.parallel.state import gather_model_state, gather_optimizer_state, local_optimizer_state
from hpcdl.parallel.strategy import StepResult, Strategy
from hpcdl.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear, shard_dims


def tensor_parallel_mlp(mlp: nn.Sequential, world: World) -> nn.Sequential:
    """The MLP with Linear layers paired column then row (an odd last one stays whole), same layer names."""
    named = list(mlp.named_children())
    replaced: dict[int, nn.Module] = {}
    for col, row in linear_pairs(mlp, world.size):
        replaced[col] = ColumnParallelLinear(named[col][1], world)
        replaced[row] = RowParallelLinear(named[row][1], world)
    return nn.Sequential(OrderedDict((name, replaced.get(i, layer)) for i, (name, layer) in enumerate(named)))


class TensorParallel(Strategy):
    """An MLP split over the layout's tensor ranks, times its replicas (world rank r: tensor rank
    r % tensor of replica r // tensor). The layout has checked the model (`Layout.check_model`)."""

    def __init__(
        self, model: nn.Module, world: World, layout: Layout, bucket_mb: float = 25.0, overlap: bool = True,
        compression: str = "none",
    ):  # fmt: skip
        self.grid = layout.grid(world)
        self.shards = self.grid.group("tensor")
        self.model = tensor_parallel_mlp(model, self.shards)
        self.dims = shard_dims(self.model)
        names = [name for name, _ in self.model.named_parameters()]
        self.param_dims = {i: self.dims[name] for i, name in enumerate(names) if name in self.dims}
        # One engine for the replicas' gradient sum (a 1-rank sub-World when replicas = 1 costs nothing).
        self.replicas = DataParallelStrategy(self.model, self.grid.group("replica"), bucket_mb, overlap, compression)
        self.params, self.param_names = self.replicas.params, self.replicas.param_names
        self.share = DataShare(self.grid.coord("replica"), self.grid.size("replica"))
        self.speaks = self.grid.coord("tensor") == 0  # one tensor rank reports each replica's figures
        self.split_group = self.shards

    def split_param_ids(self) -> set[int]:
        """The shards: parameters cut over the tensor ranks (the rest, e.g. a whole last layer, are replicated)."""
        return set(self.param_dims)

    @property
    def objective(self) -> Objective:
        """The task's loss and figures: those of the replicas' engine, which computes them."""
        return self.replicas.objective

    @objective.setter
    def objective(self, value: Objective) -> None:
        self.replicas.objective = value

    @property
    def precision(self) -> str:
        """train.precision: the replicas' engine runs the forward passes."""
        return self.replicas.precision

    @precision.setter
    def precision(self, value: str) -> None:
        self.replicas.precision = value

    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """Forward/backward with the layers' Allreduces; replicas' gradients summed when `sync`."""
        result = self.replicas.train_step(batch, timer, sync, scale)
        return result if self.speaks else StepResult()

    def evaluate_batch(self, batch: Batch) -> StepResult:
        """The figures from tensor rank 0 of each replica; zeros elsewhere."""
        result = self.replicas.evaluate_batch(batch)
        return result if self.speaks else StepResult()

    @property
    def bytes_per_sync(self) -> int:
        """Bytes of this rank's gradient shards summed over the replicas per step."""
        return self.replicas.bytes_per_sync if self.grid.size("replica") > 1 else 0

    def zero_grad(self) -> None:
        """Zero the gradients in place."""
        self.replicas.zero_grad()

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replicas start from replica 0's optimizer state."""
        self.replicas.sync_optimizer(optimizer)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The unsplit MLP's state on rank 0 (shards joined, same keys); this rank's shards elsewhere."""
        return gather_model_state(self.grid, "tensor", self.model.state_dict(), self.dims)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state with shard-shaped tensors joined as for the unsplit model (on rank 0)."""
        ids = list(range(len(self.params)))
        return gather_optimizer_state(self.grid, "tensor", optimizer.state_dict(), ids, self.param_dims)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Take this rank's block of an unsplit optimizer state."""
        ids = list(range(len(self.params)))
        optimizer.load_state_dict(
            local_optimizer_state(state, ids, self.param_dims, self.shards.rank, self.shards.size)
        )
