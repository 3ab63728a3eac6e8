"""Pipeline parallel: an nn.Sequential cut into stages over ranks, GPipe and 1F1B schedules.

A global batch is read whole by every stage of a replica (the first stage needs the
features, the last the labels, all of them the sizes), cut into micro-batches; the
activations go forward and their gradients backward through `p2p` queues. The last
stage computes `share_of_loss` per micro-batch (sum / global count), so gradients
accumulated over micro-batches and summed over replicas are the global batch's mean
gradient, exactly as one process computes it. With replicas > 1, each stage's
gradients are summed over its replicas by the data-parallel engine, started during
the last micro-batch's backward.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.data.loader import Batch
from hpcdl.errors import ConfigError
from hpcdl.metrics import PhaseTimer
from hpcdl.models import is_meta, materialize
from hpcdl.parallel.common import share_of_loss, zero_contribution
from hpcdl.parallel.data import DataParallel
from hpcdl.parallel.grid import Grid
from hpcdl.parallel.p2p import ACTIVATION, GRADIENT, RecvQueue, SendQueue, recv_meta, send_meta
from hpcdl.parallel.stages import check_layout, layers_of, stage_starts

SCHEDULES = ("gpipe", "1f1b")


# ---- schedules ---------------------------------------------------------------------------------


def schedule(kind: str, stage: int, stages: int, micro: int) -> list[tuple[str, int]]:
    """This stage's actions in order: ("F", i) forward or ("B", i) backward of micro-batch i."""
    if kind == "gpipe":
        return [("F", i) for i in range(micro)] + [("B", i) for i in range(micro)]
    # 1F1B (PipeDream-Flush): fill the pipe, then alternate, then drain.
    warmup = min(stages - stage - 1, micro)
    actions = [("F", i) for i in range(warmup)]
    for i in range(micro - warmup):
        actions += [("F", warmup + i), ("B", i)]
    return actions + [("B", i) for i in range(micro - warmup, micro)]


def peak_alive(actions: list[tuple[str, int]]) -> int:
    """Most micro-batches whose activations are held at once under `actions`."""
    alive = peak = 0
    for kind, _ in actions:
        alive += 1 if kind == "F" else -1
        peak = max(peak, alive)
    return peak


def micro_sizes(rows: int, micro: int) -> list[int]:
    """Rows of each micro-batch (np.array_split's sizes); fewer micro-batches when rows < micro."""
    parts = min(micro, rows)
    return [rows // parts + (1 if i < rows % parts else 0) for i in range(parts)] if parts else []


# ---- the strategy ------------------------------------------------------------------------------


class Pipeline:
    """This rank's stage of a Sequential model cut over `stages` ranks, times `replicas` copies.

    World rank r is stage r % stages of replica r // stages. The strategy protocol of
    `hpcdl.parallel` (train_step, evaluate_batch, model_state, ...) drives it.

    A `sequential` built on the meta device (`hpcdl.models.build(..., device="meta")` or
    under `with torch.device("meta")`) is cut by its shapes, and each rank allocates only
    its own stage: from `initial_state` (the unsplit model's state, e.g. a checkpoint's)
    if given, else layer i is initialised from (`seed`, i) as `hpcdl.models.materialize`
    does. An already allocated model is simply cut.
    """

    def __init__(
        self,
        sequential: nn.Sequential,
        stages: int,
        micro_batches: int,
        schedule: str = "1f1b",
        world: World | None = None,
        replicas: int = 1,
        *,
        balance: str = "params",
        cuts: list[int] | None = None,
        sample: torch.Tensor | None = None,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        compression: str = "none",
        seed: int = 0,
        initial_state: dict[str, torch.Tensor] | None = None,
    ):
        if world is None:
            from hpcdl import comm

            world = comm.init()
        if schedule not in SCHEDULES:
            raise ConfigError(f"parallel.schedule = {schedule!r} is not one of {', '.join(SCHEDULES)}")
        if micro_batches < 1:
            raise ConfigError(f"parallel.micro_batches = {micro_batches} must be >= 1")
        # Checked on every rank before the first collective: all fail together, with the fix.
        named = world.agree(lambda: layers_of(sequential))
        world.agree(lambda: check_layout([m for _, m in named], stages, cuts))
        starts = stage_starts([m for _, m in named], stages, balance, cuts, world, sample)
        self.grid = Grid(world, {"replica": replicas, "stage": stages})
        self.world, self.pipe = world, self.grid.group("stage")
        self.stage_index, self.stages, self.micro, self.kind = self.grid.coord("stage"), stages, micro_batches, schedule
        bounds = [*starts, len(named)]
        self.layer_range = (bounds[self.stage_index], bounds[self.stage_index + 1])
        # Keeping the original names makes the stage's state_dict keys those of the unsplit model.
        own = named[self.layer_range[0] : self.layer_range[1]]
        self.stage = nn.Sequential(OrderedDict(own))
        if is_meta(self.stage):
            materialize([(self.layer_range[0] + i, layer) for i, (_, layer) in enumerate(own)], seed)
            if initial_state is not None:
                self.stage.load_state_dict({key: initial_state[key] for key in self.stage.state_dict()})
        index = {name: i for i, (name, _) in enumerate(sequential.named_parameters())}
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.global_ids = [index[name] for name, p in self.stage.named_parameters() if p.requires_grad]
        self.dp = None
        if replicas > 1:
            self.dp = DataParallel(self.stage, self.grid.group("replica"), bucket_mb, overlap, compression)
        self.recv_act = self.recv_grad = self.send_act = self.send_grad = None
        self.peak_alive = 0  # micro-batches' activations held at once (for tests and benchmarks)

    # -- the protocol's data members

    @property
    def data_rank(self) -> int:
        """This replica's share of each global batch (all stages of a replica read the same)."""
        return self.grid.coord("replica")

    @property
    def data_size(self) -> int:
        """How many replicas split each global batch."""
        return self.grid.size("replica")

    @property
    def is_first(self) -> bool:
        return self.grid.is_first_stage

    @property
    def is_last(self) -> bool:
        return self.grid.is_last_stage

    # -- point-to-point links, connected on the first batch

    def _connect(self, batch: Batch) -> None:
        """Agree once on each boundary's sample shape and dtype; allocate the receive buffers."""
        if self.send_act is not None or self.recv_act is not None or self.stages == 1:
            return
        comm, grid = self.pipe.comm, self.grid
        shape, dtype = tuple(batch.x.shape[1:]), batch.x.dtype
        if not self.is_first:
            shape, dtype = recv_meta(comm, grid.prev_stage_rank)
            slots = peak_alive(schedule(self.kind, self.stage_index, self.stages, self.micro)) + 1
            self.recv_act = RecvQueue(comm, grid.prev_stage_rank, ACTIVATION, slots, shape, dtype)
            self.send_grad = SendQueue(comm, grid.prev_stage_rank, GRADIENT)
        if not self.is_last:
            with torch.no_grad():
                probe = self.stage(torch.zeros(1, *shape, dtype=dtype))
            send_meta(comm, grid.next_stage_rank, probe)
            self.send_act = SendQueue(comm, grid.next_stage_rank, ACTIVATION)
            self.recv_grad = RecvQueue(comm, grid.next_stage_rank, GRADIENT, 2, tuple(probe.shape[1:]), probe.dtype)

    # -- one step

    def train_step(
        self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0
    ) -> tuple[float, int, int]:
        """GPipe or 1F1B over this batch's micro-batches; gradients accumulate; replicas summed if `sync`."""
        self.stage.train()
        sizes = micro_sizes(len(batch.y), self.micro)
        if not sizes:  # this replica's share is empty: join the gradient sum with zeros
            if self.dp is not None and sync:
                zero_contribution(self.stage).backward()
                self.dp.finish_sync(timer)
            return 0.0, 0, 0
        self._connect(batch)
        xs, ys = torch.split(batch.x, sizes), torch.split(batch.y, sizes)
        for queue in (self.recv_act, self.recv_grad):
            if queue is not None:
                queue.expect(sizes)
        actions = schedule(self.kind, self.stage_index, self.stages, len(sizes))
        last_backward = len(actions) - 1
        saved: dict[int, tuple[int | None, torch.Tensor, torch.Tensor]] = {}
        stats = np.zeros(3)
        for step, (kind, i) in enumerate(actions):
            if kind == "F":
                saved[i] = self._forward(i, xs, ys, batch.global_count, scale, timer, stats)
                self.peak_alive = max(self.peak_alive, len(saved))
            else:
                communicate = sync and step == last_backward and self.dp is not None
                self._backward(*saved.pop(i), timer, communicate)
        with timer.phase("send"):
            for queue in (self.send_act, self.send_grad):
                if queue is not None:
                    queue.wait()
        if self.dp is not None and sync:
            self.dp.finish_sync(timer)
        return float(stats[0]), int(stats[1]), int(stats[2])

    def _forward(self, i, xs, ys, global_count, scale, timer, stats):
        """Forward of micro-batch i: receive (or read) its input, run the stage, send or take the loss."""
        slot = None
        if self.is_first:
            x = xs[i]
        else:
            with timer.phase("recv"):
                slot, received = self.recv_act.take()
            x = received.detach().requires_grad_()
        with timer.phase("forward"):
            out = self.stage(x)
            if self.is_last:
                loss = share_of_loss(out, Batch(xs[i], ys[i], global_count))
                stats += (loss.item() * global_count, int((out.detach().argmax(1) == ys[i]).sum()), len(ys[i]))
                out = loss * scale if scale != 1.0 else loss
        if not self.is_last:
            with timer.phase("send"):
                self.send_act.send(out)
        return slot, x, out

    def _backward(self, slot, x, out, timer, communicate: bool) -> None:
        """Backward of one micro-batch: receive the output's gradient, backprop, send the input's."""
        grad, grad_slot = None, None
        if not self.is_last:
            with timer.phase("recv"):
                grad_slot, grad = self.recv_grad.take()
        # Only the last backward of a step starts the replicas' gradient sum.
        quiet = self.dp.no_sync() if self.dp is not None and not communicate else nullcontext()
        with quiet, timer.phase("backward"):
            torch.autograd.backward(out, grad)
        if grad_slot is not None:
            self.recv_grad.release(grad_slot)
        if not self.is_first:
            with timer.phase("send"):
                self.send_grad.send(x.grad)
            self.recv_act.release(slot)

    @torch.no_grad()
    def evaluate_batch(self, batch: Batch) -> tuple[float, int, int]:
        """(summed loss, correct, samples) on the last stage; zeros elsewhere (the loop sums over ranks)."""
        self.stage.eval()
        sizes = micro_sizes(len(batch.y), self.micro)
        if not sizes:
            return 0.0, 0, 0
        self._connect(batch)
        if self.recv_act is not None:
            self.recv_act.expect(sizes)
        stats = np.zeros(3)
        for x, y in zip(torch.split(batch.x, sizes), torch.split(batch.y, sizes)):
            slot = None
            if not self.is_first:
                slot, x = self.recv_act.take()
            out = self.stage(x)
            if slot is not None:
                if out.data_ptr() == x.data_ptr():  # a view of the receive buffer must not be sent from it
                    out = out.clone()
                self.recv_act.release(slot)
            if self.is_last:
                loss = torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
                stats += (loss, int((out.argmax(1) == y).sum()), len(y))
            else:
                self.send_act.send(out)
        if self.send_act is not None:
            self.send_act.wait()
        return float(stats[0]), int(stats[1]), int(stats[2])

    def zero_grad(self) -> None:
        """Zero this stage's gradients in place."""
        if self.dp is not None:
            self.dp.zero_grad()
            return
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replicas of a stage start from replica 0's optimizer state."""
        if self.dp is not None:
            self.dp.sync_optimizer(optimizer)

    # -- checkpoints: each stage contributes its part; rank 0 holds the unsplit whole

    def model_state(self) -> dict[str, torch.Tensor]:
        """The unsplit model's state on rank 0 (same keys as the Sequential); this stage's part elsewhere."""
        own = self.stage.state_dict()
        parts = self.grid.gather_on_root("stage", own)
        if parts is None:
            return own
        return {key: value for part in parts for key, value in part.items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state keyed by the unsplit model's parameter indices (as data parallel saves it)."""
        own = optimizer.state_dict()
        glob = {
            "state": {self.global_ids[i]: v for i, v in own["state"].items()},
            "param_groups": [{**g, "params": [self.global_ids[i] for i in g["params"]]} for g in own["param_groups"]],
        }
        parts = self.grid.gather_on_root("stage", glob)
        if parts is None:
            return glob
        groups = [dict(g) for g in parts[0]["param_groups"]]
        for j, group in enumerate(groups):
            group["params"] = sorted(i for part in parts for i in part["param_groups"][j]["params"])
        return {"state": {k: v for part in parts for k, v in part["state"].items()}, "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Take this stage's entries of a whole-model optimizer state (saved in any mode)."""
        local = {g: i for i, g in enumerate(self.global_ids)}
        groups = [{**g, "params": [local[i] for i in g["params"] if i in local]} for g in state["param_groups"]]
        optimizer.load_state_dict(
            {"state": {local[k]: v for k, v in state["state"].items() if k in local}, "param_groups": groups}
        )
