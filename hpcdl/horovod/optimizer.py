"""Horovod's DistributedOptimizer on hpcdl's one gradient-sync engine (parallel/grad_sync.py), and the
broadcasts that start every rank from the same parameters and optimizer state."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hpcdl.comm import World
from hpcdl.errors import HpcdlError
from hpcdl.horovod.collectives import broadcast_async_
from hpcdl.horovod.compression import Compression, Compressor
from hpcdl.horovod.errors import ArgumentError
from hpcdl.horovod.handles import synchronize
from hpcdl.horovod.process_sets import ProcessSet, gradient_world, resolve
from hpcdl.horovod.reductions import Average, Sum, wire_op
from hpcdl.horovod.refused import not_offered
from hpcdl.parallel.data import broadcast_optimizer
from hpcdl.parallel.grad_sync import GradSync

Tensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor]


def broadcast_parameters(params: Tensors, root_rank: int = 0, process_set: ProcessSet | None = None) -> None:
    """Overwrite tensors in place with root_rank's: a state_dict(), named_parameters() or a list."""
    items = params.values() if isinstance(params, Mapping) else params
    tensors = [item[1] if isinstance(item, tuple) else item for item in items]
    handles = [
        broadcast_async_(t.data if isinstance(t, nn.Parameter) else t, root_rank, None, process_set) for t in tensors
    ]
    for handle in handles:
        synchronize(handle)


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int = 0, model: Any = None, process_set: ProcessSet | None = None
) -> None:
    """Make every rank's optimizer state and hyper-parameters equal to root_rank's."""
    pset = resolve(process_set)
    broadcast_optimizer(pset.world, optimizer, pset.set_rank(root_rank))


def _fusion_bytes() -> int:
    # Horovod's knob for its fusion buffer sets our bucket size; 25 MB is hpcdl's default.
    value = os.environ.get("HOROVOD_FUSION_THRESHOLD", "")
    return int(value) if value.isdigit() and int(value) > 0 else 25 * 2**20


def _densify(param: nn.Parameter) -> None:
    """sparse_as_dense=True: a sparse .grad (autograd's, when .grad was None) becomes dense for its bucket.

    While .grad is the bucket's view, autograd adds a sparse gradient into it densely by itself.
    """
    if param.grad.is_sparse:
        param.grad = param.grad.to_dense()


def _refuse_sparse(grad: torch.Tensor) -> None:
    """sparse_as_dense=False: hpcdl has no sparse allreduce, so a sparse gradient is an error, not a silent change."""
    if grad.is_sparse:
        raise HpcdlError(
            f"hpcdl.horovod.DistributedOptimizer: a parameter of shape {tuple(grad.shape)} has a sparse gradient "
            "(e.g. nn.Embedding(sparse=True)); hpcdl reduces gradients in dense buckets: pass "
            "sparse_as_dense=True to DistributedOptimizer (or make the layer dense)"
        )


def _parameter_names(
    params: list[nn.Parameter], named_parameters: Iterable[tuple[str, nn.Parameter]] | None
) -> dict[nn.Parameter, str]:
    """Each parameter's name (Horovod's allreduce.noname.i without named_parameters); ArgumentError (a ValueError)
    for duplicate names or optimizer parameters that `named_parameters` lacks, as Horovod's."""
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}" for i, p in enumerate(params)}
    named = list(named_parameters)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ArgumentError("hpcdl.horovod.DistributedOptimizer: named_parameters contains duplicate names")
    by_param = {p: n for n, p in named}
    if any(p not in by_param for p in params):
        raise ArgumentError(
            "hpcdl.horovod.DistributedOptimizer: named_parameters was given, but some optimizer "
            "parameters are not in it; pass model.named_parameters() of the whole model"
        )
    return {p: by_param[p] for p in params}


class _DistributedOptimizer:
    """Mixed into the user's optimizer class: gradients are averaged over ranks before each step."""

    def _hvd_setup(
        self,
        world: World,
        names: dict[nn.Parameter, str],
        compression: type[Compressor],
        backward_passes_per_step: int,
        op: str,
        sparse_as_dense: bool,
    ) -> None:
        params = list(names)
        self._parameter_names = names
        wire = getattr(compression, "wire", None)
        if wire is None:
            raise HpcdlError("hpcdl.horovod.DistributedOptimizer: compression must be hvd.Compression.none or .fp16")
        if backward_passes_per_step < 1:
            raise HpcdlError("hpcdl.horovod.DistributedOptimizer: backward_passes_per_step must be >= 1")
        if op not in (Average, Sum):
            wire_op(op)  # Adasum: a clear refusal
            raise HpcdlError("hpcdl.horovod.DistributedOptimizer: op must be hvd.Average or hvd.Sum")
        for p in params:
            if sparse_as_dense:  # registered before the engine's hooks, which take dense gradients only
                p.register_post_accumulate_grad_hook(_densify)
            else:  # sees each incoming gradient before autograd adds it (densely) to the bucket's view
                p.register_hook(_refuse_sparse)
        # The engine's hooks keep each .grad in its bucket, count the passes and start each bucket's sum.
        self._hvd_grads = GradSync(
            world,
            params,
            _fusion_bytes(),
            wire,
            passes=backward_passes_per_step,
            scale=1.0 / world.size if op == Average else 1.0,
        )
        self._hvd_synchronized = False
        self._hvd_should_synchronize = True

    def synchronize(self) -> None:
        """Wait for every gradient's allreduce (starting those not started); .grad then holds the result."""
        self._hvd_grads.finish()
        self._hvd_synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Let step() use the gradients as they are (after an explicit synchronize(), e.g. to clip)."""
        self._hvd_should_synchronize = False
        try:
            yield
        finally:
            self._hvd_should_synchronize = True

    def step(self, closure: Any = None) -> Any:
        """Synchronize the gradients (unless done already), then the wrapped optimizer's step."""
        if self._hvd_should_synchronize and self._hvd_synchronized:
            warnings.warn(
                "optimizer.step() called without optimizer.skip_synchronize() context after optimizer.synchronize(): "
                "the gradients are used as synchronized; wrap step() in `with optimizer.skip_synchronize():`",
                stacklevel=2,
            )
        elif self._hvd_should_synchronize:
            self.synchronize()
        self._hvd_synchronized = False
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (they live in the Allreduce buckets, so they are never set to None)."""
        self._hvd_grads.zero()


def DistributedOptimizer(  # noqa: N802 - Horovod's name
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    compression: type[Compressor] = Compression.none,
    backward_passes_per_step: int = 1,
    op: str = Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: ProcessSet | None = None,
) -> torch.optim.Optimizer:
    """`optimizer`, of the same class, whose step() first averages (or sums) the gradients over ranks.

    Each gradient bucket's Iallreduce starts during backward as soon as its gradients are
    final (after `backward_passes_per_step` local passes). `gradient_predivide_factor` f
    scales by 1/f before and f/size after the sum, which we apply as one 1/size after it.
    Sparse gradients need `sparse_as_dense=True`: they are reduced densely in their bucket. With
    `process_set`, its members average among themselves and other ranks keep their own gradients.
    """
    fusion = "HOROVOD_FUSION_THRESHOLD (bytes) to size the buckets"
    if groups is not None:
        not_offered("DistributedOptimizer(groups=...)", fusion)
    if num_groups != 0:
        not_offered("DistributedOptimizer(num_groups=...)", fusion)
    if gradient_predivide_factor != 1.0 and op != Average:
        raise HpcdlError("hpcdl.horovod.DistributedOptimizer: gradient_predivide_factor applies to op=hvd.Average only")
    # Checked before anything that needs hvd.init(), as Horovod's.
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    names = _parameter_names(params, named_parameters)
    base = optimizer.__class__
    cls = type(base.__name__, (_DistributedOptimizer, base), {})
    # As Horovod does: a new optimizer of a subclass over the same parameter groups; the state is kept.
    wrapped = cls(optimizer.param_groups)
    wrapped.state = optimizer.state
    wrapped._hvd_setup(gradient_world(process_set), names, compression, backward_passes_per_step, op, sparse_as_dense)
    return wrapped
