"""Run under mpiexec -n 4: column/row-parallel layers and tensor-parallel MLPs (T = 2 on two halves of the
world, T = 4, and T = 2 x 2 replicas) against the dense model in one process: outputs, gradients, 3 Adam steps."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from hpcdl import comm
from hpcdl.data.loader import Batch
from hpcdl.metrics import PhaseTimer
from hpcdl.models import MLP
from hpcdl.parallel.layout import Layout
from hpcdl.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
from hpcdl.parallel.tensor.strategy import TensorParallel

BATCH, STEPS = 16, 3


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def model(hidden: list[int]) -> MLP:
    torch.manual_seed(0)
    return MLP(12, hidden, 5)


def check_layers(shards: comm.World) -> None:
    """Column then row layer equal the two dense layers: output, input gradient, weight gradients."""
    torch.manual_seed(1)
    first, second = nn.Linear(12, 8), nn.Linear(8, 3)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    dense_out = second(torch.relu(first(x)))
    dense_out.square().sum().backward()
    col, row = ColumnParallelLinear(first, shards), RowParallelLinear(second, shards)
    xs = x.detach().clone().requires_grad_()
    out = row(torch.relu(col(xs)))
    out.square().sum().backward()
    torch.testing.assert_close(out, dense_out)
    torch.testing.assert_close(xs.grad, x.grad)
    r, t = shards.rank, shards.size
    torch.testing.assert_close(col.weight.grad, first.weight.grad.chunk(t, 0)[r])
    torch.testing.assert_close(col.bias.grad, first.bias.grad.chunk(t, 0)[r])
    torch.testing.assert_close(row.weight.grad, second.weight.grad.chunk(t, 1)[r])
    torch.testing.assert_close(row.bias.grad, second.bias.grad)


def check_mlp(world: comm.World, tensor: int, replicas: int, hidden: list[int]) -> int:
    """Three Adam steps of the tensor-parallel MLP equal the dense one's; returns Allreduce-free layers."""
    dense = model(hidden)
    dense_opt = torch.optim.Adam(dense.parameters(), lr=0.01)
    tp = TensorParallel(model(hidden), world, Layout("tensor", world.size, replicas, tensor=tensor))
    opt = torch.optim.Adam(tp.params, lr=0.01)
    timer = PhaseTimer()
    for step in range(STEPS):
        x, y = data(step)
        dense_opt.zero_grad()
        logits = dense(x)
        F.cross_entropy(logits, y).backward()
        torch.testing.assert_close(tp.model(x), logits)  # forward: outputs equal the dense layer's
        share = slice(tp.share.rank * BATCH // replicas, (tp.share.rank + 1) * BATCH // replicas)
        result = tp.train_step(Batch(x[share], y[share], BATCH), timer)
        loss_sum, count = result.loss_sum, result.samples
        total = world.allreduce_sum(torch.tensor([loss_sum, count], dtype=torch.float64).numpy())
        assert int(total[1]) == BATCH and abs(total[0] / BATCH - F.cross_entropy(logits, y).item()) < 1e-5
        whole = tp.model_state()  # on rank 0: shards joined
        if world.rank == 0:
            assert list(whole) == list(dense.state_dict()), "joined keys differ from the dense model's"
        for (name, p), d in zip(tp.model.named_parameters(), dense.parameters()):
            dim = tp.dims.get(name)
            want = d.grad if dim is None else d.grad.chunk(tensor, dim)[tp.shards.rank]
            torch.testing.assert_close(p.grad, want, msg=lambda m, name=name: f"T={tensor} {name}: {m}")
        dense_opt.step()
        opt.step()
        tp.zero_grad()
    whole, saved = tp.model_state(), tp.optimizer_state(opt)
    if world.rank == 0:
        for key, value in dense.state_dict().items():
            torch.testing.assert_close(whole[key], value, atol=1e-6, rtol=1e-5)
        for got, want in zip(saved["state"].values(), dense_opt.state_dict()["state"].values()):
            torch.testing.assert_close(got["exp_avg"], want["exp_avg"], atol=1e-6, rtol=1e-5)
        fresh = torch.optim.Adam(tp.params, lr=0.01)
        tp.load_optimizer_state(fresh, saved)
        for a, b in zip(fresh.state_dict()["state"].values(), opt.state_dict()["state"].values()):
            torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])
    return sum(isinstance(m, nn.Linear) for m in tp.model)


def main() -> None:
    world = comm.init(threads=1)
    assert world.size == 4, "run with mpiexec -n 4"
    half = world.split(world.rank // 2)
    check_layers(half)
    check_layers(world)
    report = {
        "T2_odd": check_mlp(half, 2, 1, [16, 8]),  # 3 Linear layers: the classifier stays dense
        "T2_even": check_mlp(half, 2, 1, [16, 8, 12]),
        "T4": check_mlp(world, 4, 1, [16, 8, 12]),
        "T2xR2": check_mlp(world, 2, 2, [16, 8]),
    }
    if world.rank == 0:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
