"""Horovod's PyTorch API on hpcdl's engine: move a script over by changing one import.

    import hpcdl.horovod as hvd      # instead of: import horovod.torch as hvd

Gradients go through hpcdl's bucketed, overlapped Allreduce (parallel/grad_sync.py); the
tensor collectives are MPI calls on the tensors' memory (no copies where none are needed).
A Horovod call hpcdl does not offer raises HpcdlError at call time, naming what to use.
Handles returned by the `*_async` functions are objects, not integers; pass them to
`synchronize` or `poll` as with Horovod.

Every tensor collective first agrees across ranks on its metadata (shape, dtype, root, splits), so a
mismatch raises Horovod's exception type on every rank instead of hanging; the synchronous forms are
autograd functions with Horovod's gradients; `process_set=` runs a collective on a sub-communicator.

Modules: basics (init, world queries), errors (Horovod's exception types), process_sets, handles
(async handles, names), agreement (cross-rank metadata checks), autograd, reductions (allreduce),
collectives (allgather, broadcast, alltoall, join, barrier), scatter (reducescatter), sparse (sparse allreduce),
compression, optimizer (DistributedOptimizer, parameter and optimizer-state broadcasts), refused (what is not offered).
"""

from __future__ import annotations

from hpcdl.horovod.basics import (
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
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
    rocm_built,
    shutdown,
    size,
)
from hpcdl.horovod.collectives import (
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
    grouped_allgather,
    join,
)
from hpcdl.horovod.compression import Compression, Compressor, FP16Compressor, NoneCompressor
from hpcdl.horovod.errors import HorovodInternalError
from hpcdl.horovod.handles import Handle, poll, synchronize
from hpcdl.horovod.optimizer import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters
from hpcdl.horovod.process_sets import ProcessSet, add_process_set, global_process_set, remove_process_set
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
    grouped_allreduce_,
)
from hpcdl.horovod.refused import NOT_OFFERED, refused_attribute
from hpcdl.horovod.scatter import grouped_reducescatter, reducescatter, reducescatter_async
from hpcdl.horovod.sparse import sparse_allreduce_async

__all__ = [
    "Adasum",
    "Average",
    "Compression",
    "Compressor",
    "DistributedOptimizer",
    "FP16Compressor",
    "Handle",
    "HorovodInternalError",
    "Max",
    "Min",
    "NOT_OFFERED",
    "NoneCompressor",
    "ProcessSet",
    "Product",
    "Sum",
    "add_process_set",
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
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "global_process_set",
    "gloo_built",
    "gloo_enabled",
    "grouped_allgather",
    "grouped_allreduce",
    "grouped_allreduce_",
    "grouped_reducescatter",
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
    "reducescatter",
    "reducescatter_async",
    "remove_process_set",
    "rocm_built",
    "shutdown",
    "size",
    "sparse_allreduce_async",
    "synchronize",
]

# A Horovod name we lack (hvd.SyncBatchNorm, hvd.elastic, ...) resolves to an object that raises when used.
__getattr__ = refused_attribute
