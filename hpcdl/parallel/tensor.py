"""Tensor parallel: an MLP's Linear layers split inside themselves, as in Megatron-LM.

A pair of Linear layers becomes a column-parallel layer (each rank computes a slice of
the hidden features) then a row-parallel one (each rank multiplies its slice by its
rows of the weight, and one Allreduce sums the partial outputs). The only traffic is
that Allreduce in forward and one Allreduce of the input's gradient in backward.
With an odd number of Linear layers, the last one (the classifier) stays whole and
replicated: every tensor rank computes it on the same input.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from hpcdl.comm import World, as_buffer, mpi
from hpcdl.data.loader import Batch
from hpcdl.errors import ConfigError
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.data import DataParallel
from hpcdl.parallel.grid import Grid

# Layers allowed between a column and a row layer: elementwise, without parameters or randomness.
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.Identity)


def _sum_over(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the tensor-parallel ranks (a new contiguous tensor)."""
    out = tensor.contiguous().clone()
    world.comm.Allreduce(mpi().IN_PLACE, as_buffer(out), op=mpi().SUM)
    return out


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the input's gradient over tensor ranks (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x

    @staticmethod
    def backward(ctx, grad):
        return _sum_over(ctx.world, grad), None


class _SumShards(torch.autograd.Function):
    """Forward sums partial outputs over tensor ranks; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, world):
        return _sum_over(world, x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ShardedLinear(nn.Module):
    """A Linear whose weight is split along `split_dim` over the tensor ranks (this rank keeps its slice)."""

    split_dim: int  # 0: output features (column-parallel), 1: input features (row-parallel)
    shard_dims: dict[str, int]  # how model_state joins this layer's shards back into the dense layer

    def __init__(self, in_features: int, out_features: int, world: World, bias: bool = True):
        super().__init__()
        # The whole layer is initialised the same on every rank (same seed), then sliced.
        self._take(nn.Linear(in_features, out_features, bias=bias), world)

    @classmethod
    def from_dense(cls, linear: nn.Linear, world: World) -> _ShardedLinear:
        """This rank's slice of an existing Linear."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._take(linear, world)
        return layer

    def _take(self, linear: nn.Linear, world: World) -> None:
        width = linear.weight.shape[self.split_dim]
        if width % world.size:
            side = "outputs" if self.split_dim == 0 else "inputs"
            raise ConfigError(f"a Linear with {width} {side} does not split over {world.size} tensor ranks")
        mine = slice(world.rank * width // world.size, (world.rank + 1) * width // world.size)
        self.world, self.in_features, self.out_features = world, linear.in_features, linear.out_features
        self.weight = nn.Parameter(
            linear.weight.detach().narrow(self.split_dim, mine.start, mine.stop - mine.start).clone()
        )
        self.bias = None
        if linear.bias is not None:
            # A column slice owns its outputs' biases; a row-parallel layer adds the whole bias once, after the sum.
            bias = linear.bias.detach()[mine] if "bias" in self.shard_dims else linear.bias.detach()
            self.bias = nn.Parameter(bias.clone())


class ColumnParallelLinear(_ShardedLinear):
    """A Linear whose output features are split over the tensor ranks; its output is this rank's slice."""

    split_dim = 0
    shard_dims = {"weight": 0, "bias": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToShards.apply(x, self.world), self.weight, self.bias)


class RowParallelLinear(_ShardedLinear):
    """A Linear whose input features are split over the tensor ranks; the output is summed (whole) everywhere."""

    split_dim = 1
    shard_dims = {"weight": 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _SumShards.apply(F.linear(x, self.weight), self.world)
        return out + self.bias if self.bias is not None else out


def tensor_parallel_mlp(mlp: nn.Sequential, world: World) -> nn.Sequential:
    """The MLP with Linear layers paired column then row (an odd last one stays whole), same layer names."""
    if not isinstance(mlp, nn.Sequential):
        raise ConfigError(f"parallel.mode = 'tensor' needs an MLP (an nn.Sequential); got {type(mlp).__name__}")
    named = list(mlp.named_children())
    linear_at = [i for i, (_, layer) in enumerate(named) if isinstance(layer, nn.Linear)]
    pairs = len(linear_at) // 2
    replaced: dict[int, nn.Module] = {}
    for k in range(pairs):
        col, row = linear_at[2 * k], linear_at[2 * k + 1]
        between = [type(layer).__name__ for _, layer in named[col + 1 : row] if not isinstance(layer, ELEMENTWISE)]
        if between:
            raise ConfigError(
                f"tensor parallel: layers {', '.join(between)} between Linear {col} and {row} can't be split"
            )
        hidden = named[col][1].out_features
        if hidden % world.size:
            raise ConfigError(
                f"tensor parallel: hidden width {hidden} (layer {col}) is not divisible by parallel.tensor = "
                f"{world.size}; use hidden sizes that are multiples of {world.size}"
            )
        replaced[col] = ColumnParallelLinear.from_dense(named[col][1], world)
        replaced[row] = RowParallelLinear.from_dense(named[row][1], world)
    return nn.Sequential(OrderedDict((name, replaced.get(i, layer)) for i, (name, layer) in enumerate(named)))


def shard_dims(model: nn.Module) -> dict[str, int]:
    """State key -> the dimension its tensor is split along over tensor ranks (absent: replicated)."""
    return {
        f"{prefix}.{name}": dim
        for prefix, module in model.named_modules()
        for name, dim in getattr(module, "shard_dims", {}).items()
        if getattr(module, name, None) is not None
    }


class TensorParallel:
    """An MLP split over `tensor` ranks, times `replicas` data-parallel copies (world rank r:
    tensor rank r % tensor of replica r // tensor). Replicas sum gradients with the data-parallel engine."""

    def __init__(
        self,
        model: nn.Module,
        world: World,
        tensor: int,
        replicas: int = 1,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        compression: str = "none",
    ):
        self.grid = Grid(world, {"replica": replicas, "tensor": tensor})
        self.world, self.shards = world, self.grid.group("tensor")
        self.model = world.agree(lambda: tensor_parallel_mlp(model, self.shards))  # all fail together
        self.dims = shard_dims(self.model)
        names = [name for name, _ in self.model.named_parameters()]
        self.param_dims = [self.dims.get(name) for name in names]
        # One engine for the replicas' gradient sum (a 1-rank sub-World when replicas = 1 costs nothing).
        self.engine = DataParallel(self.model, self.grid.group("replica"), bucket_mb, overlap, compression)
        self.params = self.engine.params
        self.speaks = self.grid.coord("tensor") == 0  # one tensor rank reports each replica's stats

    @property
    def data_rank(self) -> int:
        """This replica's share of each global batch (all tensor ranks of a replica read the same)."""
        return self.grid.coord("replica")

    @property
    def data_size(self) -> int:
        """How many replicas split each global batch."""
        return self.grid.size("replica")

    def train_step(
        self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0
    ) -> tuple[float, int, int]:
        """Forward/backward with the layers' Allreduces; replicas' gradients summed when `sync`."""
        stats = self.engine.train_step(batch, timer, sync, scale)
        return stats if self.speaks else (0.0, 0, 0)

    def evaluate_batch(self, batch: Batch) -> tuple[float, int, int]:
        """(summed loss, correct, samples) from tensor rank 0 of each replica; zeros elsewhere."""
        stats = self.engine.evaluate_batch(batch)
        return stats if self.speaks else (0.0, 0, 0)

    def zero_grad(self) -> None:
        """Zero the gradients in place."""
        self.engine.zero_grad()

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replicas start from replica 0's optimizer state."""
        self.engine.sync_optimizer(optimizer)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The unsplit MLP's state on rank 0 (shards joined, same keys); this rank's shards elsewhere."""
        own = self.model.state_dict()
        parts = self.grid.gather_on_root("tensor", own)
        if parts is None:
            return own
        return {k: torch.cat([p[k] for p in parts], self.dims[k]) if k in self.dims else v for k, v in own.items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state with shard-shaped tensors joined as for the unsplit model (on rank 0)."""
        own = optimizer.state_dict()
        parts = self.grid.gather_on_root("tensor", own["state"])
        if parts is None:
            return own
        joined = {}
        for i, entry in own["state"].items():
            dim, shape = self.param_dims[i], self.params[i].shape
            joined[i] = {
                key: torch.cat([p[i][key] for p in parts], dim)
                if dim is not None and torch.is_tensor(value) and value.shape == shape
                else value
                for key, value in entry.items()
            }
        return {"state": joined, "param_groups": own["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Take this rank's slice of an unsplit optimizer state."""
        rank, size = self.shards.rank, self.shards.size
        local = {}
        for i, entry in state["state"].items():
            dim = self.param_dims[i]
            shape = self.params[i].shape
            whole = (*shape[:dim], shape[dim] * size, *shape[dim + 1 :]) if dim is not None else None
            local[i] = {
                key: value.chunk(size, dim)[rank].clone() if torch.is_tensor(value) and value.shape == whole else value
                for key, value in entry.items()
            }
        optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})
