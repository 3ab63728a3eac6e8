"""Parameter servers: ranks 0..S-1 hold the model's parameters, dealt out by size; the other ranks (workers)
compute gradients on their shares of each global batch, push them to the servers and pull the parameters
back. Messages are point-to-point and non-blocking, one per server shard (a server's parameters of one
dtype), into buffers allocated once.

`ps-sync`: each server sums the workers' gradients (in worker order) and applies the optimizer once per step:
the same step as data parallel with the same global batch, to rounding.

`ps-async`: each worker's gradient (its own rows' mean) is applied alone as it arrives, and the server replies
with the parameters after it. A gradient computed on parameters more than `max_staleness` updates behind the
server's is not applied: the worker gets the server's current parameters, computes its gradient again on them
and pushes it again (it waits for fresh parameters rather than let an old gradient move them). Servers count
each applied gradient's staleness; `deterministic` applies them in worker order instead of arrival order.
The ranks still meet once per step in the step guard's small Allreduce (stop signals, NaN), so the updates
are asynchronous within a step, not across steps.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hpcdl.comm import Request, World, waitall, waitany
from hpcdl.data.loader import Batch
from hpcdl.data.partition import DataShare
from hpcdl.metrics import PhaseTimer
from hpcdl.parallel.data import broadcast_module
from hpcdl.parallel.state import join_optimizer_states, keyed_optimizer_state, local_optimizer_state
from hpcdl.parallel.strategy import StepResult, Strategy, forward_backward, named_params

GRAD_TAG, PARAM_TAG, HEADER_TAG = 7101, 7102, 7103
APPLIED, TOO_STALE = 0, 1  # a server's answer to an async push


def deal_by_size(sizes: list[int], servers: int) -> list[int]:
    """The server of each parameter: the largest first, each to the least loaded server so far."""
    load, owner = [0] * servers, [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        server = min(range(servers), key=lambda s: (load[s], s))
        owner[index], load[server] = server, load[server] + sizes[index]
    return owner


@dataclass
class Shard:
    """A server's parameters of one dtype: what travels in one message each way."""

    server: int
    ids: list[int]  # indices into the model's parameters, in model order
    params: list[nn.Parameter]
    grads: torch.Tensor  # worker: its gradients to push; server: the gradient being applied (params' .grad)
    values: torch.Tensor  # the parameters on the wire (pulled by workers, sent by servers)
    incoming: list[torch.Tensor] = field(default_factory=list)  # ps-sync server: each worker's gradients

    def pack_grads(self) -> None:
        torch.cat([p.grad.reshape(-1) for p in self.params], out=self.grads)

    def pack_values(self) -> None:
        torch.cat([p.detach().reshape(-1) for p in self.params], out=self.values)

    def unpack_values(self) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.values[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


class ParameterServer(Strategy):
    """Servers holding the parameters and applying the optimizer; workers computing gradients."""

    def __init__(
        self,
        model: nn.Module,
        world: World,
        servers: int,
        asynchronous: bool = False,
        max_staleness: int = 4,
        deterministic: bool = False,
    ):
        self.model, self.world, self.servers = model, world, servers
        self.asynchronous, self.max_staleness, self.deterministic = asynchronous, max_staleness, deterministic
        self.is_server = world.rank < servers
        self.workers = list(range(servers, world.size))
        everything = [p for p in model.parameters() if p.requires_grad]
        broadcast_module(world, model)
        self.owner = deal_by_size([p.numel() for p in everything], servers)
        self.shards = self._make_shards(everything)
        if self.is_server:
            self.global_ids = [i for i, s in enumerate(self.owner) if s == world.rank]
            self.params = [everything[i] for i in self.global_ids]
            self.share = DataShare(None, len(self.workers))
        else:
            self.global_ids = list(range(len(everything)))
            self.params = everything
            self.share = DataShare(world.rank - servers, len(self.workers))
            # Workers never step their optimizer (the servers do); their schedulers step to keep the position.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        self.param_names = named_params(model, self.params)
        self.version = 0  # async server: the updates it has applied
        self.versions = [0] * len(self.shards)  # async worker: each shard's server version its parameters hold
        self.staleness: Counter[int] = Counter()
        self.recomputed = 0
        self.sends: list[Request] = []
        self.last: tuple[Batch, float] | None = None  # async worker: the batch to compute again when too stale

    def _make_shards(self, everything: list[nn.Parameter]) -> list[Shard]:
        """The shards this rank exchanges: a server's own, or every server's on a worker."""
        shards = []
        for server in range(self.servers) if not self.is_server else [self.world.rank]:
            mine = [i for i, s in enumerate(self.owner) if s == server]
            for dtype in dict.fromkeys(everything[i].dtype for i in mine):
                ids = [i for i in mine if everything[i].dtype == dtype]
                params = [everything[i] for i in ids]
                numel = sum(p.numel() for p in params)
                shard = Shard(server, ids, params, torch.zeros(numel, dtype=dtype), torch.zeros(numel, dtype=dtype))
                if self.is_server:
                    offset = 0
                    for p in params:  # the optimizer reads .grad: views into the gradient being applied
                        p.grad = shard.grads[offset : offset + p.numel()].view_as(p)
                        offset += p.numel()
                    if not self.asynchronous:
                        shard.incoming = [torch.zeros(numel, dtype=dtype) for _ in self.workers]
                shards.append(shard)
        return shards

    # -- the step

    def train_step(self, batch: Batch, timer: PhaseTimer, sync: bool = True, scale: float = 1.0) -> StepResult:
        """Worker: forward and backward, then (sync) push the gradients; server: (sync) sum the workers' pushes."""
        if self.is_server:
            if sync and not self.asynchronous:
                with timer.phase("comm"):
                    self._sum_pushes()
            return StepResult()
        # ps-sync: a share of the global mean (the servers' sum is the mean); ps-async: this worker's own mean.
        scale = scale * len(self.workers) if self.asynchronous else scale
        result = forward_backward(self, self.model, batch, timer, scale)
        self.last = (batch, scale)
        if sync and not self.asynchronous:
            with timer.phase("comm"):
                self._push(self.shards)
        return result

    def _push(self, shards: list[Shard], header: bool = False) -> None:
        """Worker: send the gradients of `shards` to their servers (async: each after its version)."""
        waitall(self.sends)
        self.sends = []
        for shard in shards:
            shard.pack_grads()
            if header:
                stamp = np.array([self.versions[self.shards.index(shard)]], dtype=np.int64)
                self.sends.append(self.world.isend_buffer(stamp, shard.server, HEADER_TAG))
            self.sends.append(self.world.isend_buffer(shard.grads, shard.server, GRAD_TAG))

    def _sum_pushes(self) -> None:
        """ps-sync server: every worker's gradients of each shard, summed in worker order into .grad."""
        requests = [
            self.world.irecv_buffer(shard.incoming[k], worker, GRAD_TAG)
            for shard in self.shards
            for k, worker in enumerate(self.workers)
        ]
        waitall(requests)
        for shard in self.shards:
            shard.grads.copy_(shard.incoming[0])
            for more in shard.incoming[1:]:
                shard.grads.add_(more)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, timer: PhaseTimer) -> None:
        """Servers apply the optimizer and send the parameters; workers pull them (async: push first)."""
        if self.asynchronous:
            (self._serve_async if self.is_server else self._push_pull_async)(optimizer, timer)
            return
        if self.is_server:
            with timer.phase("optimizer"):
                optimizer.step()
            with timer.phase("comm"):
                for shard in self.shards:
                    shard.pack_values()
                sends = [
                    self.world.isend_buffer(shard.values, worker, PARAM_TAG)
                    for shard in self.shards
                    for worker in self.workers
                ]
                waitall(sends)
            return
        with timer.phase("comm"):
            pulls = [self.world.irecv_buffer(shard.values, shard.server, PARAM_TAG) for shard in self.shards]
            waitall(pulls + self.sends)
            self.sends = []
            for shard in self.shards:
                shard.unpack_values()

    # -- ps-async

    def _serve_async(self, optimizer: torch.optim.Optimizer, timer: PhaseTimer) -> None:
        """One applied gradient from every worker, each as it arrives (or in worker order), each answered."""
        (shard,) = self.shards  # one dtype per server in async mode (checked)
        stamps = {w: np.zeros(1, dtype=np.int64) for w in self.workers}
        waiting = list(self.workers)
        requests = {w: self.world.irecv_buffer(stamps[w], w, HEADER_TAG) for w in waiting}
        while waiting:
            with timer.phase("comm"):
                if self.deterministic:
                    worker = waiting[0]
                    requests[worker].wait()
                else:
                    index = waitany([requests[w] for w in waiting])
                    worker = waiting[index]
                self.world.recv_buffer(shard.grads, worker, GRAD_TAG)
            staleness = self.version - int(stamps[worker][0])
            answer = TOO_STALE if staleness > self.max_staleness else APPLIED
            if answer == APPLIED:
                with timer.phase("optimizer"):
                    optimizer.step()
                self.version += 1
                self.staleness[staleness] += 1
                waiting.remove(worker)
            else:
                requests[worker] = self.world.irecv_buffer(stamps[worker], worker, HEADER_TAG)
            with timer.phase("comm"):
                shard.pack_values()
                self.world.send_buffer(np.array([answer, self.version], dtype=np.int64), worker, HEADER_TAG)
                self.world.send_buffer(shard.values, worker, PARAM_TAG)

    def _push_pull_async(self, optimizer: torch.optim.Optimizer, timer: PhaseTimer) -> None:
        """Push to every server; a server that finds the gradient too stale sends fresh parameters: compute again."""
        pending = list(self.shards)
        while pending:
            with timer.phase("comm"):
                self._push(pending, header=True)
                answers = []
                for shard in pending:
                    reply = np.zeros(2, dtype=np.int64)
                    self.world.recv_buffer(reply, shard.server, HEADER_TAG)
                    self.world.recv_buffer(shard.values, shard.server, PARAM_TAG)
                    shard.unpack_values()
                    self.versions[self.shards.index(shard)] = int(reply[1])
                    answers.append(int(reply[0]))
                waitall(self.sends)
                self.sends = []
            pending = [shard for shard, answer in zip(pending, answers) if answer == TOO_STALE]
            if pending:  # on the fresh parameters just received
                self.recomputed += 1
                self.zero_grad()
                batch, scale = self.last
                forward_backward(self, self.model, batch, timer, scale)

    # -- the rest of the interface

    def evaluate_batch(self, batch: Batch) -> StepResult:
        """Workers score their rows with the parameters pulled last; servers hold no rows."""
        if self.is_server or not len(batch.y):
            return StepResult()
        self.model.eval()
        with self.autocast():
            return self.objective.evaluate_batch(self.model, batch)

    def grad_norm(self) -> float:
        """The norm of the summed gradient the servers hold (ps-sync), the same on every rank."""
        own = sum(float(p.grad.detach().double().pow(2).sum()) for p in self.params) if self.is_server else 0.0
        return float(np.sqrt(self.world.allreduce_sum(np.array([own]))[0]))

    def zero_grad(self) -> None:
        """Workers zero their gradients; a server's are overwritten by the next sum or push."""
        if not self.is_server:
            super().zero_grad()

    @property
    def bytes_per_sync(self) -> int:
        """Bytes this rank sends and receives per step: gradients and parameters, once per worker on a server."""
        per_shard = sum(shard.nbytes for shard in self.shards)
        return 2 * per_shard * (len(self.workers) if self.is_server else 1)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model on rank 0: each server's parameters, the first worker's buffers (a collective)."""
        names = dict(zip(map(id, self.model.parameters()), (n for n, _ in self.model.named_parameters())))
        if self.is_server:
            own = {names[id(p)]: p.detach().clone() for p in self.params}
        elif self.world.rank == self.servers:
            own = {name: value for name, value in self.model.named_buffers()}
        else:
            own = {}
        parts = self.world.gather(own)
        whole = self.model.state_dict()
        if parts is None:
            return whole
        joined = {key: value for part in parts for key, value in part.items()}
        return {key: joined.get(key, value) for key, value in whole.items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The servers' optimizer states joined as the unsplit model's, on rank 0."""
        mine = keyed_optimizer_state(optimizer.state_dict(), self.global_ids) if self.is_server else None
        parts = self.world.gather(mine)
        return mine if parts is None else join_optimizer_states([p for p in parts if p is not None], {})

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Each server takes its parameters' entries; workers keep none (they never step)."""
        if self.is_server:
            optimizer.load_state_dict(local_optimizer_state(state, self.global_ids, {}, 0, 1))

    def summary(self) -> dict:
        """ps-async: the staleness of every applied gradient, summed over servers, and the pushes made again."""
        if not self.asynchronous:
            return {}
        counts = self.world.allgather(dict(self.staleness))
        histogram: Counter[int] = Counter()
        for part in counts:
            histogram.update(part)
        recomputed = int(self.world.allreduce_sum(np.array([float(self.recomputed)]))[0])
        return {
            "staleness_histogram": {str(k): histogram[k] for k in sorted(histogram)},
            "max_staleness": self.max_staleness,
            "recomputed_pushes": recomputed,
        }
