"""Local SGD: every rank takes `local_steps` optimizer steps on its own share of each global batch, then the
ranks average their weights with one Allreduce (Stich 2019); with `post_local_steps` = K the first K steps
are plain data parallel (post-local SGD, Lin et al. 2020), when the weights move most.

Between averages a rank's loss is its share of the global mean times the number of ranks, i.e. about its
own rows' mean, and the average of the ranks' gradients is the global batch's mean gradient: with
local_steps = 1 and SGD (with or without momentum, both linear in the gradient) the average after every
step is data parallel's step, to rounding.

Between averages the ranks' weights differ, so a checkpoint holds their average as the model (what a
resume on other ranks, `hpcdl infer` and model.pt use) and, for a bitwise resume on the same ranks, every
rank's own weights and optimizer state (`local_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from hpcdl.comm import SUMMABLE, World
from hpcdl.data.loader import Batch
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.data import DataParallelStrategy
from hpcdl.parallel.strategy import StepResult


def average_in_place(world: World, tensors: list[torch.Tensor]) -> int:
    """Replace each tensor by its mean over the ranks of `world`: one Allreduce per dtype; returns bytes sent."""
    sent = 0
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        wire = dtype if dtype in SUMMABLE else torch.float32  # MPI has no bfloat16 sum: summed in float32
        flat = torch.cat([t.detach().reshape(-1).to(wire) for t in group])
        world.allreduce_(flat)
        flat.div_(world.size)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        sent += flat.numel() * flat.element_size()
    return sent


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's per-parameter floating-point state (momentum, moments), without step counts."""
    return [
        value
        for entry in optimizer.state.values()
        for key, value in entry.items()
        if key != "step" and torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0
    ]


class LocalSGD(DataParallelStrategy):
    """Replicas that step alone for `local_steps` optimizer steps, then average their weights."""

    replicated = False  # the ranks' weights differ between averages: the replica check does not apply

    def __init__(
        self,
        model: nn.Module,
        world: World,
        local_steps: int,
        post_local_steps: int = 0,
        average_optimizer: bool = False,
        bucket_mb: float = 25.0,
        overlap: bool = True,
    ):
        super().__init__(model, world, bucket_mb, overlap)
        self.local_steps, self.post_local_steps = local_steps, post_local_steps
        self.average_optimizer = average_optimizer
        self.updates = 0  # optimizer steps taken: the clock of averages (kept in checkpoints)
        self.averages = 0
        self.averaged_bytes = 0

    @property
    def local_phase(self) -> bool:
        """Whether steps are local now (after the post-local steps of data parallel)."""
        return self.updates >= self.post_local_steps

    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """Data parallel's step in the first phase; afterwards forward and backward on this rank's rows alone."""
        if not self.local_phase:
            return super().train_step(batch, timer, sync, scale)
        with self.no_sync():
            return self.forward_backward(batch, timer, scale * self.world.size)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, timer: PhaseTimer) -> None:
        """This rank's step; every `local_steps` local steps, the ranks' weights (and state) averaged."""
        local = self.local_phase
        with timer.phase("optimizer"):
            optimizer.step()
        self.updates += 1
        if local and (self.updates - self.post_local_steps) % self.local_steps == 0:
            with timer.phase("comm"), torch.no_grad():
                tensors = [p.data for p in self.params]
                if self.average_optimizer:
                    tensors += optimizer_tensors(optimizer)
                self.averaged_bytes += average_in_place(self.world, tensors)
                self.averages += 1

    @property
    def bytes_per_sync(self) -> int:
        """Bytes this rank reduces per optimizer step once local: the averaged tensors, every `local_steps`."""
        return self.grads.bytes_per_sync // self.local_steps

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: every rank starts from the same state (fresh, or the checkpoint's) or from its own saved one."""

    def model_state(self) -> dict[str, torch.Tensor]:
        """The ranks' average weights on rank 0 (this rank's live weights are left as they are)."""
        state = {key: value.clone() for key, value in self.model.state_dict().items()}
        with torch.no_grad():
            average_in_place(self.world, [v for v in state.values() if v.is_floating_point()])
        return state

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The ranks' average optimizer state on rank 0: where a resume on another number of ranks starts."""
        state = optimizer.state_dict()
        averaged = {
            index: {key: value.clone() if torch.is_tensor(value) else value for key, value in entry.items()}
            for index, entry in state["state"].items()
        }
        with torch.no_grad():
            average_in_place(
                self.world,
                [v for e in averaged.values() for k, v in e.items() if k != "step" and torch.is_tensor(v)],
            )
        return {**state, "state": averaged}

    def local_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Every rank's own weights and optimizer state, and the averaging clock, on rank 0."""
        own = {"model": self.model.state_dict(), "optimizer": optimizer.state_dict()}
        ranks = self.world.gather(own, root=0)
        return {"mode": "local-sgd", "world_size": self.world.size, "updates": self.updates, "ranks": ranks}

    def load_local_state(self, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
        """This rank's own weights and state when the run continues on as many ranks; else the average (loaded)."""
        if not state or state.get("mode") != "local-sgd":
            return
        self.updates = int(state["updates"])
        if state["world_size"] == self.world.size:
            own = state["ranks"][self.world.rank]
            self.model.load_state_dict(own["model"])
            optimizer.load_state_dict(own["optimizer"])

    def summary(self) -> dict:
        """How often the ranks averaged, and the bytes each sent for it."""
        return {"local_sgd": {"averages": self.averages, "averaged_bytes": self.averaged_bytes}}
