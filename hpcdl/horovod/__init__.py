"""Horovod's PyTorch API on hpcdl's engine: move a script over by changing one import.

    import hpcdl.horovod as hvd      # instead of: import horovod.torch as hvd

Gradients go through hpcdl's bucketed, overlapped Allreduce (parallel/grad_sync.py); the
tensor collectives are MPI calls on the tensors' memory (no copies where none are needed).
A Horovod call hpcdl does not offer raises HpcdlError at call time, naming what to use.
Handles returned by the `*_async` functions are objects, not integers; pass them to
`synchronize` or `poll` as with Horovod.

Modules: basics (init, world queries), reductions (allreduce), collectives (handles, allgather,
broadcast, alltoall, join, barrier), compression, optimizer (DistributedOptimizer, broadcasts of
parameters and optimizer state), refused (what is not offered).
"""

from __future__ import annotations

from hpcdl.horovod.basics import (
    cross_rank,
    cross_size,
    gloo_built,
    gloo_enabled,
    init,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    shutdown,
    size,
)
from hpcdl.horovod.collectives import (
    Handle,
    allgather,
    allgather_async,
    allgather_object,
    alltoall,
    alltoall_async,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    broadcast_object,
    join,
    poll,
    synchronize,
)
from hpcdl.horovod.compression import Compression, Compressor, FP16Compressor, NoneCompressor
from hpcdl.horovod.optimizer import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters
from hpcdl.horovod.reductions import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    grouped_allreduce,
)
from hpcdl.horovod.refused import NOT_OFFERED, refused_attribute

__all__ = [
    "NOT_OFFERED",
    "Adasum",
    "Average",
    "Compression",
    "Compressor",
    "DistributedOptimizer",
    "FP16Compressor",
    "Handle",
    "Max",
    "Min",
    "NoneCompressor",
    "Product",
    "Sum",
    "allgather",
    "allgather_async",
    "allgather_object",
    "allreduce",
    "allreduce_",
    "allreduce_async",
    "allreduce_async_",
    "alltoall",
    "alltoall_async",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_async",
    "broadcast_async_",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "cross_rank",
    "cross_size",
    "gloo_built",
    "gloo_enabled",
    "grouped_allreduce",
    "init",
    "is_initialized",
    "join",
    "local_rank",
    "local_size",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "poll",
    "rank",
    "shutdown",
    "size",
    "synchronize",
]

# A Horovod name we lack (hvd.SyncBatchNorm, hvd.elastic, ...) resolves to an object that raises when used.
__getattr__ = refused_attribute
