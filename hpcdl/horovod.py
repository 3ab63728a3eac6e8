"""Horovod's PyTorch API on hpcdl's engine: move a script over by changing one import.

    import hpcdl.horovod as hvd      # instead of: import horovod.torch as hvd

Gradients go through hpcdl's bucketed, overlapped Allreduce (parallel/buckets.py); the
tensor collectives are MPI calls on the tensors' memory (no copies where none are needed).
A Horovod call hpcdl does not offer raises HpcdlError at call time, naming what to use.
Handles returned by the `*_async` functions are objects, not integers; pass them to
`synchronize` or `poll` as with Horovod.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcdl.comm import World, as_buffer, mpi
from hpcdl.errors import HpcdlError
from hpcdl.parallel.buckets import GradBuckets
from hpcdl.parallel.data import broadcast_optimizer

# Reduction ops, as Horovod names them.
Average, Sum, Adasum, Min, Max, Product = "average", "sum", "adasum", "min", "max", "product"

_world: World | None = None


# ----------------------------------------------------------------------------- the world


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Start MPI (once) and hpcdl's error handling: an uncaught exception on any rank ends every rank."""
    global _world
    if comm is not None or process_sets is not None:
        _not_offered("init(comm=...) / process sets", "hpcdl.init().split(color) for a sub-communicator")
    from hpcdl.api import init as hpcdl_init

    _world = hpcdl_init()


def _w() -> World:
    if _world is None:
        raise HpcdlError("hpcdl.horovod: call hvd.init() first")
    return _world


def is_initialized() -> bool:
    """True between init() and shutdown()."""
    return _world is not None


def shutdown() -> None:
    """Forget the world; MPI itself is finalised when the program exits (mpi4py does it)."""
    global _world
    _world = None


def size() -> int:
    """Number of ranks."""
    return _w().size


def rank() -> int:
    """This rank."""
    return _w().rank


def local_rank() -> int:
    """This rank's index on its node."""
    return _w().local_rank


def local_size() -> int:
    """Ranks on this node."""
    return _w().local_size


def cross_rank() -> int:
    """This rank's node index."""
    return _w().node


def cross_size() -> int:
    """Number of nodes."""
    return _w().num_nodes


def mpi_threads_supported() -> bool:
    """True when MPI was initialised with MPI_THREAD_MULTIPLE."""
    MPI = mpi()
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_enabled() -> bool:
    """Always True: every collective here is MPI."""
    return True


def mpi_built() -> bool:
    """Always True."""
    return True


def gloo_enabled() -> bool:
    """Always False: hpcdl uses MPI only."""
    return False


def gloo_built() -> bool:
    """Always False."""
    return False


def nccl_built() -> bool:
    """Always False: hpcdl's collectives run on CPU tensors through MPI."""
    return False


# ----------------------------------------------------------------------------- compression


class Compressor:
    """Compresses a tensor before it travels and restores it after (Horovod's interface)."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The tensor to send and the context needed to restore it."""
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """The received tensor in its original type."""
        return tensor


class NoneCompressor(Compressor):
    """Send tensors as they are."""

    wire = "none"


class FP16Compressor(Compressor):
    """Send floating-point tensors as float16."""

    wire = "fp16"

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """float16 copy of a floating-point tensor (others unchanged), and its original dtype."""
        if tensor.dtype.is_floating_point:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Back to the original dtype."""
        return tensor.to(ctx) if ctx is not None and ctx.is_floating_point else tensor


class Compression:
    """Horovod's `hvd.Compression.none` and `hvd.Compression.fp16`."""

    none = NoneCompressor
    fp16 = FP16Compressor


# ----------------------------------------------------------------------------- tensor collectives


def _mpi_type(dtype: torch.dtype):
    MPI = mpi()
    types = {
        torch.float32: MPI.FLOAT,
        torch.float64: MPI.DOUBLE,
        torch.float16: MPI.FLOAT16_T if hasattr(MPI, "FLOAT16_T") else None,
        torch.int64: MPI.INT64_T,
        torch.int32: MPI.INT32_T,
        torch.int16: MPI.INT16_T,
        torch.int8: MPI.INT8_T,
        torch.uint8: MPI.UINT8_T,
        torch.bool: MPI.C_BOOL,
        torch.bfloat16: MPI.INT16_T,  # moved as bits; reduced in float32 (MPI has no bfloat16)
    }
    if types.get(dtype) is None:
        raise HpcdlError(f"hpcdl.horovod: tensors of dtype {dtype} are not supported by MPI here")
    return types[dtype]


def _mpi_op(op: str):
    MPI = mpi()
    ops = {Average: MPI.SUM, Sum: MPI.SUM, Min: MPI.MIN, Max: MPI.MAX, Product: MPI.PROD}
    if op == Adasum:
        _not_offered("op=hvd.Adasum", "op=hvd.Average (the default) or op=hvd.Sum")
    if op not in ops:
        raise HpcdlError(f"hpcdl.horovod: unknown reduction op {op!r}; use hvd.Average, hvd.Sum, hvd.Min or hvd.Max")
    return ops[op]


def _resolve_op(op: str | None, average: bool | None) -> str:
    if op is not None and average is not None:
        raise HpcdlError("hpcdl.horovod: give op= or the deprecated average=, not both")
    if op is None:
        return Sum if average is False else Average
    return op


def _buf(tensor: torch.Tensor) -> list:
    return [as_buffer(tensor), _mpi_type(tensor.dtype)]


@dataclass
class Handle:
    """A collective in flight; `synchronize(handle)` waits for it and returns its result."""

    request: Any
    finish: Callable[[], Any]
    result: Any = None
    done: bool = False
    keep: list = field(default_factory=list)  # buffers MPI is still using


def _handle(request: Any, finish: Callable[[], Any], *keep: Any) -> Handle:
    return Handle(request, finish, keep=list(keep))


def poll(handle: Handle) -> bool:
    """True when the collective has finished (synchronize then returns at once)."""
    return handle.done or bool(handle.request.Test())


def synchronize(handle: Handle) -> Any:
    """Wait for an async collective and return its result."""
    if not handle.done:
        handle.request.Wait()
        handle.result, handle.done, handle.keep = handle.finish(), True, []
    return handle.result


def _scale(work: torch.Tensor, factor: float, divisor: int) -> None:
    """work *= factor / divisor in place; integer tensors round toward zero, as Horovod's do."""
    if factor == 1 and divisor == 1:
        return
    if work.dtype.is_floating_point:
        work.mul_(factor / divisor)
    else:
        work.copy_(torch.div(work * factor, divisor, rounding_mode="trunc"))


def _allreduce_into(
    tensor: torch.Tensor, target: torch.Tensor, op: str, prescale: float, postscale: float, compression
) -> Handle:
    """Start reducing `tensor` into `target` (same shape) over ranks."""
    mpi_op = _mpi_op(op)
    wire, ctx = compression.compress(tensor.detach())
    reduce_as = torch.float32 if wire.dtype == torch.bfloat16 else wire.dtype
    work = wire.to(reduce_as, copy=True).contiguous()  # our own buffer: the input stays untouched
    _scale(work, prescale, 1)
    request = _w().comm.Iallreduce(mpi().IN_PLACE, _buf(work), op=mpi_op)

    def finish() -> torch.Tensor:
        _scale(work, postscale, size() if op == Average else 1)
        with torch.no_grad():
            target.copy_(compression.decompress(work.to(wire.dtype), ctx).view_as(target))
        return target

    return _handle(request, finish, work)


def allreduce_async(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression=Compression.none,
    process_set: Any = None,
) -> Handle:
    """Start averaging (or summing) `tensor` over ranks; `synchronize` returns a new tensor."""
    _no_process_set(process_set)
    target = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _allreduce_into(tensor, target, _resolve_op(op, average), prescale_factor, postscale_factor, compression)


def allreduce(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    compression=None,
    op=None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> torch.Tensor:
    """Average (default) or sum of `tensor` over ranks, as a new tensor; the input is not modified."""
    handle = allreduce_async(
        tensor, average, name, op, prescale_factor, postscale_factor, compression or Compression.none, process_set
    )
    return synchronize(handle)


def allreduce_async_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op=None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> Handle:
    """Start reducing `tensor` in place; `synchronize` returns `tensor`."""
    _no_process_set(process_set)
    return _allreduce_into(
        tensor, tensor, _resolve_op(op, average), prescale_factor, postscale_factor, Compression.none
    )


def allreduce_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op=None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> torch.Tensor:
    """Average (default) or sum `tensor` over ranks, in place; returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


def grouped_allreduce(
    tensors: list[torch.Tensor],
    average: bool | None = None,
    name: str | None = None,
    compression=None,
    op=None,
    **scale: float,
) -> list[torch.Tensor]:
    """allreduce of each tensor, all in flight together."""
    handles = [
        allreduce_async(t, average, name, op, compression=compression or Compression.none, **scale) for t in tensors
    ]
    return [synchronize(h) for h in handles]


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> Handle:
    """Start concatenating every rank's `tensor` along dim 0 (first dims may differ)."""
    _no_process_set(process_set)
    source = tensor.detach().contiguous()
    # The shapes travel first (small, blocking): the receiving side needs every rank's row count.
    shapes = _w().comm.allgather((tuple(source.shape), str(source.dtype)))
    if len({(s[1:], d) for s, d in shapes}) != 1 or any(len(s) == 0 for s, _ in shapes):
        found = ", ".join(f"rank {r}: {d} {tuple(s)}" for r, (s, d) in enumerate(shapes))
        raise HpcdlError(
            "hpcdl.horovod.allgather: tensors must have the same dtype and the same shape after dim 0 "
            f"on every rank ({found})"
        )
    rows = [s[0] for s, _ in shapes]
    row = int(np.prod(source.shape[1:], dtype=np.int64))
    output = torch.empty((sum(rows), *source.shape[1:]), dtype=source.dtype)
    counts = [r * row for r in rows]
    request = _w().comm.Iallgatherv(_buf(source), [as_buffer(output), counts, _mpi_type(output.dtype)])
    return _handle(request, lambda: output, source)


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order."""
    return synchronize(allgather_async(tensor, name, process_set))


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    return _w().comm.allgather(obj)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> Handle:
    """Start overwriting `tensor` on every rank with root_rank's, in place."""
    _no_process_set(process_set)
    work = tensor.data if tensor.is_contiguous() else tensor.detach().contiguous()
    request = _w().comm.Ibcast(_buf(work), root=root_rank)

    def finish() -> torch.Tensor:
        if work.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(work)
        return tensor

    return _handle(request, finish, work)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """Overwrite `tensor` with root_rank's, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> Handle:
    """Start broadcasting root_rank's `tensor`; `synchronize` returns a new tensor."""
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """root_rank's `tensor`, as a new tensor on every rank; the input is not modified."""
    return synchronize(broadcast_async(tensor, root_rank, name, process_set))


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None, process_set: Any = None) -> Any:
    """root_rank's picklable `obj` on every rank."""
    _no_process_set(process_set)
    return _w().comm.bcast(obj, root=root_rank)


def alltoall_async(tensor: torch.Tensor, splits=None, name: str | None = None, process_set: Any = None) -> Handle:
    """Start sending rows `splits[r]` of `tensor` (along dim 0) to rank r; see `alltoall`."""
    _no_process_set(process_set)
    source = tensor.detach().contiguous()
    ranks = size()
    if splits is None:
        if source.ndim == 0 or source.shape[0] % ranks:
            raise HpcdlError(
                f"hpcdl.horovod.alltoall: without splits, dim 0 ({tuple(source.shape)}) must divide by {ranks} ranks"
            )
        send_rows = np.full(ranks, source.shape[0] // ranks, dtype=np.int64)
    else:
        send_rows = np.asarray(splits.tolist() if torch.is_tensor(splits) else list(splits), dtype=np.int64)
        if send_rows.shape != (ranks,) or (send_rows < 0).any() or send_rows.sum() != source.shape[0]:
            raise HpcdlError(
                f"hpcdl.horovod.alltoall: splits {send_rows.tolist()} must be {ranks} non-negative row counts "
                f"summing to dim 0 = {source.shape[0]}"
            )
    recv_rows = np.empty(ranks, dtype=np.int64)
    _w().comm.Alltoall(send_rows, recv_rows)
    row = int(np.prod(source.shape[1:], dtype=np.int64))
    output = torch.empty((int(recv_rows.sum()), *source.shape[1:]), dtype=source.dtype)
    kind = _mpi_type(source.dtype)
    request = _w().comm.Ialltoallv(
        [as_buffer(source), (send_rows * row).tolist(), kind], [as_buffer(output), (recv_rows * row).tolist(), kind]
    )
    received = torch.from_numpy(recv_rows.astype(np.int32))
    return _handle(request, lambda: output if splits is None else (output, received), source)


def alltoall(tensor: torch.Tensor, splits=None, name: str | None = None, process_set: Any = None):
    """Rows `splits[r]` of `tensor` go to rank r (equal parts without splits), concatenated in rank order.

    Returns the received tensor; with `splits`, (tensor, received splits) as Horovod does.
    """
    return synchronize(alltoall_async(tensor, splits, name, process_set))


def join(device: int = -1) -> int:
    """Wait for every rank; returns the rank that arrived last.

    Unlike Horovod, ranks that joined do not keep serving the others' allreduces: every
    rank must run the same number of collectives before joining (split the data evenly).
    """
    began = time.perf_counter()
    _w().comm.Barrier()
    waited = time.perf_counter() - began
    # The last to arrive waited least: a local duration, no clocks compared across nodes.
    waits = _w().comm.allgather(waited)
    return int(np.argmin(waits))


def barrier(process_set: Any = None) -> None:
    """Wait until every rank gets here."""
    _no_process_set(process_set)
    _w().comm.Barrier()


# ----------------------------------------------------------------------------- parameters and optimizers


def _tensors_of(params) -> list[tuple[str, torch.Tensor]]:
    items = params.items() if isinstance(params, dict) else params
    pairs = []
    for item in items:
        name, tensor = item if isinstance(item, tuple) else (str(len(pairs)), item)
        pairs.append((name, tensor))
    return pairs


def broadcast_parameters(params, root_rank: int = 0, process_set: Any = None) -> None:
    """Overwrite tensors in place with root_rank's: a state_dict(), named_parameters() or a list."""
    _no_process_set(process_set)
    handles = [
        broadcast_async_(t.data if isinstance(t, nn.Parameter) else t, root_rank) for _, t in _tensors_of(params)
    ]
    for handle in handles:
        synchronize(handle)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0, model: Any = None) -> None:
    """Make every rank's optimizer state and hyper-parameters equal to root_rank's."""
    broadcast_optimizer(_w(), optimizer, root_rank)


def _fusion_bytes() -> int:
    # Horovod's knob for its fusion buffer sets our bucket size; 25 MB is hpcdl's default.
    value = os.environ.get("HOROVOD_FUSION_THRESHOLD", "")
    return int(value) if value.isdigit() and int(value) > 0 else 25 * 2**20


class _DistributedOptimizer:
    """Mixed into the user's optimizer class: gradients are averaged over ranks before each step."""

    def _hvd_setup(self, named_parameters, compression, backward_passes_per_step: int, op: str, scale: float):
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if named_parameters is not None:
            named = list(named_parameters)
            names = [n for n, _ in named]
            if len(set(names)) != len(names):
                raise HpcdlError("hpcdl.horovod.DistributedOptimizer: named_parameters contains duplicate names")
            known = {id(p) for _, p in named}
            if any(id(p) not in known for p in params):
                raise HpcdlError(
                    "hpcdl.horovod.DistributedOptimizer: named_parameters was given, but some optimizer "
                    "parameters are not in it; pass model.named_parameters() of the whole model"
                )
        wire = getattr(compression, "wire", None)
        if wire is None:
            raise HpcdlError("hpcdl.horovod.DistributedOptimizer: compression must be hvd.Compression.none or .fp16")
        if backward_passes_per_step < 1:
            raise HpcdlError("hpcdl.horovod.DistributedOptimizer: backward_passes_per_step must be >= 1")
        if op not in (Average, Sum):
            _mpi_op(op)  # Adasum: a clear refusal
            raise HpcdlError("hpcdl.horovod.DistributedOptimizer: op must be hvd.Average or hvd.Sum")
        self._hvd_params = params
        self._hvd_buckets = GradBuckets(_w(), params, _fusion_bytes(), wire)
        self._hvd_views = {p: p.grad for p in params}
        self._hvd_passes = backward_passes_per_step
        self._hvd_delay = {p: backward_passes_per_step for p in params}
        self._hvd_scale = (1.0 / size() if op == Average else 1.0) * scale
        self._hvd_synchronized = False
        self._hvd_should_synchronize = True
        for p in params:
            p.register_post_accumulate_grad_hook(self._hvd_on_grad)

    def _hvd_on_grad(self, param: nn.Parameter) -> None:
        view = self._hvd_views[param]
        if param.grad.data_ptr() != view.data_ptr():
            # zero_grad(set_to_none=True) dropped the bucket view; put the fresh gradient back in it.
            view.copy_(param.grad)
            param.grad = view
        self._hvd_delay[param] -= 1
        if self._hvd_delay[param] > 0:
            return  # still accumulating locally (backward_passes_per_step)
        bucket = self._hvd_buckets.mark_ready(param)
        if bucket is not None:
            self._hvd_buckets.start(bucket)
        self._hvd_buckets.progress()

    def synchronize(self) -> None:
        """Wait for every gradient's allreduce (starting those not started); .grad then holds the result."""
        buckets = self._hvd_buckets
        buckets.start_all_idle()
        buckets.wait()
        if self._hvd_scale != 1.0:
            for bucket in buckets.buckets:
                bucket.flat.mul_(self._hvd_scale)
        self._hvd_delay = dict.fromkeys(self._hvd_params, self._hvd_passes)
        self._hvd_synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Let step() use the gradients as they are (after an explicit synchronize(), e.g. to clip)."""
        self._hvd_should_synchronize = False
        try:
            yield
        finally:
            self._hvd_should_synchronize = True

    def step(self, closure=None):
        """Synchronize the gradients (unless done already), then the wrapped optimizer's step."""
        if self._hvd_should_synchronize and not self._hvd_synchronized:
            self.synchronize()
        self._hvd_synchronized = False
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (they live in the Allreduce buckets, so they are never set to None)."""
        self._hvd_buckets.zero()


def DistributedOptimizer(  # noqa: N802 - Horovod's name
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    compression=Compression.none,
    backward_passes_per_step: int = 1,
    op: str = Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: Any = None,
) -> torch.optim.Optimizer:
    """`optimizer`, of the same class, whose step() first averages (or sums) the gradients over ranks.

    Each gradient bucket's Iallreduce starts during backward as soon as its gradients are
    final (after `backward_passes_per_step` local passes). `gradient_predivide_factor` f
    scales by 1/f before and f/size after the sum, which we apply as one scale after it.
    """
    _no_process_set(process_set)
    if groups is not None:
        _not_offered("DistributedOptimizer(groups=...)", "HOROVOD_FUSION_THRESHOLD (bytes) to size the buckets")
    base = optimizer.__class__
    cls = type(base.__name__, (_DistributedOptimizer, base), {})
    # As Horovod does: a new optimizer of a subclass over the same parameter groups; the state is kept.
    wrapped = cls(optimizer.param_groups)
    wrapped.state = optimizer.state
    wrapped._hvd_setup(named_parameters, compression, backward_passes_per_step, op, 1.0)
    return wrapped


# ----------------------------------------------------------------------------- what is not offered


def _not_offered(what: str, instead: str) -> None:
    raise HpcdlError(f"hpcdl.horovod: {what} is not offered by hpcdl; use {instead} instead")


def _no_process_set(process_set: Any) -> None:
    if process_set is not None:
        _not_offered("process_set=", "hpcdl.init().split(color) and mpi4py on the sub-communicator")


# Horovod names without an hpcdl equivalent -> what to use instead.
NOT_OFFERED = {
    "SyncBatchNorm": "torch.nn.BatchNorm (statistics per rank) or torch.nn.GroupNorm",
    "ProcessSet": "hpcdl.init().split(color) for a sub-communicator",
    "add_process_set": "hpcdl.init().split(color) for a sub-communicator",
    "remove_process_set": "hpcdl.init().split(color) for a sub-communicator",
    "reducescatter": "hvd.allreduce and keep your rank's rows",
    "grouped_reducescatter": "hvd.allreduce and keep your rank's rows",
    "sparse_allreduce_async": "dense gradients (sparse_as_dense)",
    "start_timeline": "hpcdl.metrics.PhaseTimer or the time split `hpcdl train` prints",
    "stop_timeline": "hpcdl.metrics.PhaseTimer or the time split `hpcdl train` prints",
    "elastic": "checkpoints (hpcdl.checkpoint) and `hpcdl train --resume` at any number of ranks",
    "run": "mpirun -n N python your_script.py (or srun / sbatch)",
}


class _NotOffered:
    """Stands for a Horovod name we lack: calling it, or any attribute of it, says what to use instead."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _not_offered(f"hvd.{self._name}", NOT_OFFERED[self._name])

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # introspection (copy, inspect) sees an ordinary object
            raise AttributeError(attribute)
        _not_offered(f"hvd.{self._name}.{attribute}", NOT_OFFERED[self._name])


def __getattr__(name: str) -> Any:
    if name in NOT_OFFERED:
        return _NotOffered(name)
    raise AttributeError(f"module 'hpcdl.horovod' has no attribute {name!r}")
