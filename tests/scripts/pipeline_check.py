"""Run under mpiexec -n 4: pipeline stages (2 and 4, GPipe and 1F1B, and 2 stages x 2 replicas) against
the unsplit model in one process: loss, every gradient, activations held, and three SGD steps.

Each rank gets the model on the meta device and allocates only its stage, which must equal
its part of the unsplit model; one more layout takes an already allocated model instead."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from hpcdl import comm
from hpcdl.data.loader import Batch
from hpcdl.metrics import PhaseTimer
from hpcdl.models import MLP, is_meta, materialize
from hpcdl.parallel.pipeline import Pipeline

BATCH, MICRO, STEPS = 24, 6, 3


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def model(allocated: bool = True) -> MLP:
    """12 layers (Flatten, 6 x Linear, 5 x ReLU), layer i initialised from seed (0, i); shapes only if not allocated."""
    with torch.device("meta"):
        net = MLP(12, [16, 16, 16, 16, 16], 5)
    if allocated:
        materialize(enumerate(net), seed=0)
    return net


def reference() -> tuple[list[float], list[dict], dict]:
    """Loss and gradients of each step, and the final state, of plain SGD on the unsplit model."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
        opt.step()
    return losses, grads, net.state_dict()


def check(world: comm.World, stages: int, replicas: int, kind: str, expected, allocated: bool = False) -> dict:
    """One pipeline layout on `world`; returns what rank 0 of it saw."""
    losses, grads, final = expected
    net = model(allocated)
    pipe = Pipeline(net, stages, MICRO, kind, world, replicas, seed=0)
    first, end = pipe.layer_range
    others = [layer for i, layer in enumerate(net) if not first <= i < end and list(layer.parameters())]
    assert allocated or all(map(is_meta, others)), "a layer of another stage was allocated on this rank"
    assert not is_meta(pipe.stage), "this rank's stage was not allocated"
    names = {id(p): n for n, p in pipe.stage.named_parameters()}
    opt = torch.optim.SGD(pipe.params, lr=0.1, momentum=0.9)
    timer = PhaseTimer()
    for step in range(STEPS):
        x, y = data(step)
        share = slice(pipe.share.rank * BATCH // replicas, (pipe.share.rank + 1) * BATCH // replicas)
        result = pipe.train_step(Batch(x[share], y[share], BATCH), timer)
        loss_sum, count = result.loss_sum, result.samples
        total = world.allreduce_sum(torch.tensor([loss_sum, count], dtype=torch.float64).numpy())
        assert int(total[1]) == BATCH, f"{kind} S={stages}: {total[1]} samples counted, expected {BATCH}"
        assert abs(total[0] / BATCH - losses[step]) < 1e-5, f"{kind} S={stages}: loss {total[0] / BATCH}"
        for p in pipe.params:
            torch.testing.assert_close(p.grad, grads[step][names[id(p)]], atol=1e-6, rtol=1e-5)
        opt.step()
        pipe.zero_grad()
    state = pipe.model_state()
    if world.rank == 0:
        assert list(state) == list(final), "merged state's keys differ from the unsplit model's"
        for key in final:
            torch.testing.assert_close(state[key], final[key], atol=1e-6, rtol=1e-5)
    # Optimizer state keyed like the unsplit model's: reload it and get this stage's own back.
    saved = pipe.optimizer_state(opt)
    if world.rank == 0:
        assert sorted(saved["state"]) == list(range(len(final))), "gathered optimizer state is incomplete"
        fresh = torch.optim.SGD(pipe.params, lr=0.1, momentum=0.9)
        pipe.load_optimizer_state(fresh, saved)
        for a, b in zip(fresh.state_dict()["state"].values(), opt.state_dict()["state"].values()):
            torch.testing.assert_close(a["momentum_buffer"], b["momentum_buffer"])
    return {"peak_alive": pipe.peak_alive, "layers": list(pipe.layer_range)}


def main() -> None:
    world = comm.init(threads=1)
    assert world.size == 4, "run with mpiexec -n 4"
    expected = reference()
    half = world.split(world.rank // 2)  # two independent 2-rank worlds
    report = {}
    for kind in ("gpipe", "1f1b"):
        report[f"S4_{kind}"] = world.comm.allgather(check(world, 4, 1, kind, expected))
        report[f"S2_{kind}"] = half.comm.allgather(check(half, 2, 1, kind, expected))
        report[f"S2xR2_{kind}"] = world.comm.allgather(check(world, 2, 2, kind, expected))
    report["S4_allocated"] = world.comm.allgather(check(world, 4, 1, "1f1b", expected, allocated=True))
    if world.rank == 0:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
