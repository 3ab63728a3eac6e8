"""Linear layers split over ranks, as in Megatron-LM, and the two autograd functions that join them.

A column-parallel Linear keeps a block of the output features; a row-parallel Linear keeps
a block of the input features, and one Allreduce sums the partial outputs. Tensor mode
pairs them (column then row); column mode splits the MLP's first Linear as a row-parallel
layer fed by the columns of the data each rank reads. Blocks are cut by `block_range`, so
an uneven split (column mode) works the same as an even one.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from hpcdl.comm import World
from hpcdl.data.partition import block_range


def _sum_over(world: World, tensor: torch.Tensor, layer: ShardedLinear | None = None) -> torch.Tensor:
    """`tensor` summed over the ranks of `world` (a new contiguous tensor); the time goes to `layer.comm_s`."""
    began = time.perf_counter()
    # The sum must not overwrite an autograd input in place; half-precision activations (autocast) are summed
    # in fp32: MPI cannot add bfloat16, and fp16 partial sums would lose what fp32 keeps.
    wide = tensor.dtype not in (torch.float32, torch.float64)
    out = tensor.contiguous().float() if wide else tensor.contiguous().clone()
    world.allreduce_(out)
    out = out.to(tensor.dtype) if wide else out
    if layer is not None:
        layer.comm_s += time.perf_counter() - began
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
    """Forward sums partial outputs over ranks; identity backward (Megatron's g): the output's
    gradient is already the same on every rank, so summing it would multiply it by their number."""

    @staticmethod
    def forward(ctx, x, layer):
        return _sum_over(layer.world, x, layer)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ShardedLinear(nn.Module):
    """A Linear whose weight is cut along `split_dim` over the ranks of `world` (this rank keeps its block)."""

    split_dim: int  # 0: output features (column-parallel), 1: input features (row-parallel)
    shard_dims: dict[str, int]  # which tensors are blocks, along which dimension (to join them for checkpoints)

    def __init__(self, linear: nn.Linear, world: World):
        super().__init__()
        self.world, self.in_features, self.out_features = world, linear.in_features, linear.out_features
        width = linear.weight.shape[self.split_dim]
        self.block = block_range(width, world.rank, world.size)
        start, stop = self.block
        self.weight = nn.Parameter(linear.weight.detach().narrow(self.split_dim, start, stop - start).clone())
        self.bias = None
        if linear.bias is not None:
            # A column block owns its outputs' biases; a row-parallel layer adds the whole bias once, after the sum.
            bias = linear.bias.detach()[start:stop] if "bias" in self.shard_dims else linear.bias.detach()
            self.bias = nn.Parameter(bias.clone())
        self.comm_s = 0.0  # time in the forward Allreduce (reported as communication)


class ColumnParallelLinear(ShardedLinear):
    """A Linear whose output features are split over the ranks; its output is this rank's block of them."""

    split_dim = 0
    shard_dims = {"weight": 0, "bias": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToShards.apply(x, self.world), self.weight, self.bias)


class RowParallelLinear(ShardedLinear):
    """A Linear whose input features are split over the ranks; the output is summed (whole) on every rank."""

    split_dim = 1
    shard_dims = {"weight": 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _SumShards.apply(F.linear(x, self.weight), self)
        return out + self.bias if self.bias is not None else out


def shard_dims(model: nn.Module) -> dict[str, int]:
    """State key -> the dimension its tensor is split along (absent: the same on every rank)."""
    return {
        f"{prefix}.{name}": dim
        for prefix, module in model.named_modules()
        for name, dim in getattr(module, "shard_dims", {}).items()
        if getattr(module, name, None) is not None
    }


def comm_seconds(model: nn.Module) -> float:
    """Time the model's sharded layers spent in their forward Allreduce since the last call (then reset)."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, ShardedLinear):
            total, module.comm_s = total + module.comm_s, 0.0
    return total
