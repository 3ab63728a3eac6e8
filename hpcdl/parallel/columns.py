"""Partitioning by columns: each rank reads only its slice of every sample's features.

For samples too wide for one rank. The MLP's first Linear is split by its input
columns: rank r holds W[:, c0:c1] and reads x[:, c0:c1] of every sample of the
global batch, computes the partial product x_r @ W_r^T, and one Allreduce sums
the partial products into the whole first layer's output on every rank. From
there every rank holds an identical replica of the rest of the model and sees
the whole batch, so the layers after the first compute identical gradients:
they need no gradient exchange at all. The first layer's weight gradient
grad_out^T @ x_r is local; backward through the forward Allreduce is the
identity, because grad_out is already the same on every rank (summing it over
ranks would multiply it by their number).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from hpcdl.comm import World, mpi
from hpcdl.data.loader import Batch
from hpcdl.errors import ConfigError
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.common import evaluate_batch, share_of_loss


def column_range(features: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's [c0, c1) of `features` columns: contiguous blocks, the remainder on the first ranks."""
    base, extra = divmod(features, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _SumPartials(torch.autograd.Function):
    """Forward: Allreduce-sum of every rank's partial product. Backward: the identity (see module doc)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, layer: ColumnSplitLinear) -> torch.Tensor:
        began = time.perf_counter()
        total = partial.clone()  # the sum must not overwrite an autograd input in place
        layer.world.comm.Allreduce(mpi().IN_PLACE, total.numpy(), op=mpi().SUM)
        layer.comm_s += time.perf_counter() - began
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_total, None


class ColumnSplitLinear(nn.Module):
    """A Linear whose input columns are split over ranks; `weight` holds this rank's columns only."""

    def __init__(self, full: nn.Linear, world: World, columns: tuple[int, int]):
        super().__init__()
        self.world, self.columns, self.in_features = world, columns, full.in_features
        c0, c1 = columns
        self.weight = nn.Parameter(full.weight.detach()[:, c0:c1].clone())
        # The bias is replicated and added once, after the sum: its gradient is the same everywhere.
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None
        self.comm_s = 0.0  # time in the forward Allreduce, reported as communication

    def forward(self, x_columns: torch.Tensor) -> torch.Tensor:
        total = _SumPartials.apply(x_columns @ self.weight.t(), self)
        return total + self.bias if self.bias is not None else total

    def full_weight(self) -> torch.Tensor:
        """The unsplit weight, gathered from every rank's columns (on every rank)."""
        return gather_columns(self.world, self.weight.detach(), self.in_features)


def gather_columns(world: World, part: torch.Tensor, features: int) -> torch.Tensor:
    """Concatenate every rank's column block (rows x its columns) into rows x `features`."""
    rows = part.shape[0]
    counts = [rows * (c1 - c0) for c0, c1 in (column_range(features, r, world.size) for r in range(world.size))]
    whole_t = torch.empty(features, rows, dtype=part.dtype)
    # Transposed blocks are contiguous row blocks of W^T, so one Allgatherv assembles them.
    world.comm.Allgatherv(part.t().contiguous().numpy(), [whole_t.numpy(), counts])
    return whole_t.t().contiguous()


class ColumnParallel:
    """The strategy of `data.partition = "columns"`: the MLP's first layer split by input columns."""

    def __init__(self, model: nn.Module, world: World):
        def check() -> None:
            first = model[1] if isinstance(model, nn.Sequential) and len(model) > 1 else None
            if not isinstance(model[0], nn.Flatten) or not isinstance(first, nn.Linear):
                raise ConfigError("config: data.partition = 'columns' needs model.name = 'mlp'")
            if first.in_features < world.size:
                raise ConfigError(
                    f"config: data.partition = 'columns' splits {first.in_features} features over "
                    f"{world.size} ranks; use at most {first.in_features} ranks"
                )

        world.agree(check)
        self.model, self.world = model, world
        self.columns = column_range(model[1].in_features, world.rank, world.size)
        self.first = ColumnSplitLinear(model[1], world, self.columns)
        model[1] = self.first
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _forward(self, batch: Batch, timer: PhaseTimer) -> torch.Tensor:
        self.first.comm_s = 0.0
        began = time.perf_counter()
        logits = self.model(batch.x)
        timer.add("forward", time.perf_counter() - began - self.first.comm_s)
        timer.add("comm", self.first.comm_s)
        return logits

    def _counted(self, stats: tuple[float, int, int]) -> tuple[float, int, int]:
        # Every rank holds the whole batch; rank 0 alone reports it, so sums over ranks count it once.
        return stats if self.world.is_root else (0.0, 0, 0)

    def train_step(
        self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0
    ) -> tuple[float, int, int]:
        """Forward (with the partial-product Allreduce) and backward; no gradient exchange is needed."""
        self.model.train()
        logits = self._forward(batch, timer)
        loss = share_of_loss(logits, batch)
        with timer.phase("backward"):
            (loss * scale if scale != 1.0 else loss).backward()
        correct = int((logits.detach().argmax(dim=1) == batch.y).sum())
        return self._counted((loss.item() * batch.global_count, correct, len(batch.y)))

    def evaluate_batch(self, batch: Batch) -> tuple[float, int, int]:
        """(summed loss, correct, samples) of the batch, counted on rank 0 only."""
        self.model.eval()
        return self._counted(evaluate_batch(self.model, batch))

    def zero_grad(self) -> None:
        """Zero every gradient."""
        for p in self.params:
            p.grad = None

    @property
    def data_rank(self) -> int:
        """Every rank reads every sample of the batch (its own columns)."""
        return 0

    @property
    def data_size(self) -> int:
        """The batch is not split over ranks."""
        return 1

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: every rank builds (or loads) the same state, sliced the same way."""

    def model_state(self) -> dict[str, torch.Tensor]:
        """The unsplit model's state: the first layer's weight gathered from every rank's columns."""
        state = self.model.state_dict()
        state["1.weight"] = self.first.full_weight()
        return state

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state with the first weight's per-parameter tensors gathered whole."""
        state = optimizer.state_dict()
        # A copy: the state dict shares its per-parameter dicts with the live optimizer.
        first = state["state"][0] = dict(state["state"].get(0, {}))
        for key, value in list(first.items()):
            if torch.is_tensor(value) and value.shape == self.first.weight.shape:
                first[key] = gather_columns(self.world, value, self.first.in_features)
        return state

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore a whole-model optimizer state, keeping this rank's columns of the first weight."""
        c0, c1 = self.columns
        first = state["state"][0] = dict(state["state"].get(0, {}))
        full_shape = (self.first.weight.shape[0], self.first.in_features)
        for key, value in list(first.items()):
            if torch.is_tensor(value) and tuple(value.shape) == full_shape:
                first[key] = value[:, c0:c1].clone()
        optimizer.load_state_dict(state)
