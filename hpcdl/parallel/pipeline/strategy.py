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

from hpcdl.comm import World, init
from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.device import CPU
from hpcdl.errors import ConfigError
from hpcdl.metrics import PhaseTimer
from hpcdl.models import is_meta, materialize
from hpcdl.parallel.data import DataParallelStrategy
from hpcdl.parallel.layout import Layout, named_layers
from hpcdl.parallel.loss import zero_contribution
from hpcdl.parallel.pipeline.p2p import ACTIVATION, GRADIENT, RecvQueue, SendQueue, recv_meta, send_meta
from hpcdl.parallel.pipeline.schedule import SCHEDULES, micro_sizes, peak_alive, schedule
from hpcdl.parallel.pipeline.stages import stage_starts
from hpcdl.parallel.state import gather_model_state, gather_optimizer_state, local_optimizer_state
from hpcdl.parallel.strategy import StepResult, Strategy


class Pipeline(Strategy):
    """This rank's stage of a Sequential model cut over `stages` ranks, times `replicas` copies.

    World rank r is stage r % stages of replica r // stages (the layout's grid).

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
        device: torch.device = CPU,
    ):
        world = world or init()

        def check() -> tuple[Layout, list[tuple[str, nn.Module]]]:
            if schedule not in SCHEDULES:
                raise ConfigError(f"parallel.schedule = {schedule!r} is not one of {', '.join(SCHEDULES)}")
            if micro_batches < 1:
                raise ConfigError(f"parallel.micro_batches = {micro_batches} must be >= 1")
            layout = Layout(
                "pipeline", world.size, replicas, stages, micro_batches=micro_batches, cuts=tuple(cuts or ())
            )
            named = named_layers(sequential, "pipeline")
            layout.check_stages([m for _, m in named])
            return layout, named

        # Checked on every rank before the first collective: all fail together, with the fix.
        layout, named = world.agree(check)
        starts = stage_starts([m for _, m in named], stages, balance, cuts, world, sample)
        self.grid = layout.grid(world)
        self.world, self.pipe = world, self.grid.group("stage")
        self.split_group = self.pipe  # each stage holds its own layers
        self.stage_index, self.stages, self.micro, self.kind = self.grid.coord("stage"), stages, micro_batches, schedule
        bounds = [*starts, len(named)]
        self.stage_starts = list(starts)  # where each stage begins (the same on every rank): the run summary says it
        self.layer_range = (bounds[self.stage_index], bounds[self.stage_index + 1])
        # Keeping the original names makes the stage's state_dict keys those of the unsplit model.
        own = named[self.layer_range[0] : self.layer_range[1]]
        self.stage = nn.Sequential(OrderedDict(own))
        if is_meta(self.stage):
            materialize([(self.layer_range[0] + i, layer) for i, (_, layer) in enumerate(own)], seed)
            if initial_state is not None:
                self.stage.load_state_dict({key: initial_state[key] for key in self.stage.state_dict()})
        self.device = device
        self.stage.to(device)
        index = {name: i for i, (name, _) in enumerate(sequential.named_parameters())}
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.param_names = [name for name, p in self.stage.named_parameters() if p.requires_grad]
        self.global_ids = [index[name] for name in self.param_names]
        self.share = DataShare(self.grid.coord("replica"), self.grid.size("replica"))
        self.dp = None
        if replicas > 1:
            self.dp = DataParallelStrategy(self.stage, self.grid.group("replica"), bucket_mb, overlap, compression)
        self.recv_act = self.recv_grad = self.send_act = self.send_grad = None
        self.peak_alive = 0  # micro-batches' activations held at once (for tests and benchmarks)

    @property
    def is_first(self) -> bool:
        """True on the first stage (it reads the features)."""
        return self.grid.is_first_stage

    @property
    def is_last(self) -> bool:
        """True on the last stage (it computes the loss)."""
        return self.grid.is_last_stage

    @property
    def bytes_per_sync(self) -> int:
        """Bytes of this stage's gradients summed over its replicas per step."""
        return self.dp.bytes_per_sync if self.dp is not None else 0

    # -- point-to-point links, connected on the first batch

    def _connect(self, batch: Batch) -> None:
        """Agree once on each boundary's sample shape and dtype; allocate the receive buffers."""
        if self.send_act is not None or self.recv_act is not None or self.stages == 1:
            return
        pipe, grid = self.pipe, self.grid
        shape, dtype = tuple(batch.x.shape[1:]), batch.x.dtype
        if not self.is_first:
            shape, dtype = recv_meta(pipe, grid.prev_stage_rank)
            slots = peak_alive(schedule(self.kind, self.stage_index, self.stages, self.micro)) + 1
            self.recv_act = RecvQueue(pipe, grid.prev_stage_rank, ACTIVATION, slots, shape, dtype, self.device)
            self.send_grad = SendQueue(pipe, grid.prev_stage_rank, GRADIENT, self.device)
        if not self.is_last:
            with torch.no_grad(), self.autocast():  # under autocast the activations travel in bf16/fp16
                probe = self.stage(torch.zeros(1, *shape, dtype=dtype, device=self.device))
            send_meta(pipe, grid.next_stage_rank, probe)
            self.send_act = SendQueue(pipe, grid.next_stage_rank, ACTIVATION, self.device)
            self.recv_grad = RecvQueue(
                pipe, grid.next_stage_rank, GRADIENT, 2, tuple(probe.shape[1:]), probe.dtype, self.device
            )

    # -- one step

    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """GPipe or 1F1B over this batch's micro-batches; gradients accumulate; replicas summed if `sync`."""
        self.stage.train()
        sizes = micro_sizes(len(batch.y), self.micro)
        if not sizes:  # this replica's share is empty: join the gradient sum with zeros
            if self.dp is not None and sync:
                zero_contribution(self.stage).backward()
                self.dp.finish_sync(timer)
            return StepResult()
        self._connect(batch)
        xs, ys = torch.split(batch.x, sizes), torch.split(batch.y, sizes)
        # Each micro-batch keeps its rows' sample indices: a loss may look rows up by them (distillation's logits).
        rows = np.split(batch.indices, np.cumsum(sizes)[:-1]) if batch.indices is not None else [None] * len(sizes)
        for queue in (self.recv_act, self.recv_grad):
            if queue is not None:
                queue.expect(sizes)
        actions = schedule(self.kind, self.stage_index, self.stages, len(sizes))
        last_backward = len(actions) - 1
        saved: dict[int, tuple[int | None, torch.Tensor, torch.Tensor]] = {}
        stats = np.zeros(self.objective.width)
        for step, (kind, i) in enumerate(actions):
            if kind == "F":
                saved[i] = self._forward(i, xs, ys, rows, batch.global_count, scale, timer, stats)
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
        return StepResult.from_vector(stats)

    def _forward(self, i, xs, ys, rows, global_count, scale, timer, stats):
        """Forward of micro-batch i: receive (or read) its input, run the stage, send or take the loss."""
        slot = None
        if self.is_first:
            x = xs[i]
        else:
            with timer.phase("recv"):
                slot, received = self.recv_act.take()
            x = received.detach().requires_grad_()
        with timer.phase("forward"), self.autocast():
            out = self.stage(x)
            if self.is_last:
                loss = self.objective.share_of_loss(out, Batch(xs[i], ys[i], global_count, indices=rows[i]))
                stats += self.objective.counted(out, ys[i], loss.item() * global_count).vector(len(stats))
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
    def evaluate_batch(self, batch: Batch) -> StepResult:
        """The figures on the last stage; zeros elsewhere (the loop sums over ranks)."""
        self.stage.eval()
        sizes = micro_sizes(len(batch.y), self.micro)
        if not sizes:
            return StepResult()
        self._connect(batch)
        if self.recv_act is not None:
            self.recv_act.expect(sizes)
        stats = np.zeros(self.objective.width)
        for x, y in zip(torch.split(batch.x, sizes), torch.split(batch.y, sizes)):
            slot = None
            if not self.is_first:
                slot, x = self.recv_act.take()
            with self.autocast():
                out = self.stage(x)
            if slot is not None:
                if out.data_ptr() == x.data_ptr():  # a view of the receive buffer must not be sent from it
                    out = out.clone()
                self.recv_act.release(slot)
            if self.is_last:
                with self.autocast():
                    stats += self.objective.evaluated(out, y).vector(len(stats))
            else:
                self.send_act.send(out)
        if self.send_act is not None:
            self.send_act.wait()
        return StepResult.from_vector(stats)

    def summary(self) -> dict:
        """Where the model was cut, and the schedule that ran it."""
        return {"pipeline": {"stage_starts": self.stage_starts, "micro_batches": self.micro, "schedule": self.kind}}

    def split_param_ids(self) -> set[int]:
        """Every parameter: this stage's layers are its own, the other stages hold the rest."""
        return set(range(len(self.params)))

    def zero_grad(self) -> None:
        """Zero this stage's gradients in place."""
        if self.dp is not None:
            self.dp.zero_grad()
            return
        super().zero_grad()

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replicas of a stage start from replica 0's optimizer state."""
        if self.dp is not None:
            self.dp.sync_optimizer(optimizer)

    # -- checkpoints: each stage contributes its part; rank 0 holds the unsplit whole

    def model_state(self) -> dict[str, torch.Tensor]:
        """The unsplit model's state on rank 0 (same keys as the Sequential); this stage's part elsewhere."""
        return gather_model_state(self.grid, "stage", self.stage.state_dict(), {})

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state keyed by the unsplit model's parameter indices (as data parallel saves it)."""
        return gather_optimizer_state(self.grid, "stage", optimizer.state_dict(), self.global_ids, {})

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Take this stage's entries of a whole-model optimizer state (saved in any mode)."""
        optimizer.load_state_dict(local_optimizer_state(state, self.global_ids, {}, 0, 1))
