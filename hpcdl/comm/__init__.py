"""The communication layer: the one World per process and every way its ranks talk. Nothing else imports mpi4py.

`World` (world.py) holds each collective and point-to-point operation hpcdl uses as a typed method; around it,
the dtype map and reductions by name (buffers.py), device memory's one way to MPI (transport.py), non-blocking
requests (requests.py), one-sided counters (window.py), how an error ends every rank (failure.py), starting MPI
once per process (launch.py) and the library itself (library.py).
"""

from hpcdl.comm.buffers import SUMMABLE, Op, mpi_type
from hpcdl.comm.failure import EXIT_ERROR, EXIT_REQUEUE, abort, rank_ranges
from hpcdl.comm.launch import init
from hpcdl.comm.library import bindings_version, library_version, mpi, thread_multiple
from hpcdl.comm.requests import Request, testall, waitall, waitany
from hpcdl.comm.transport import CUDA_AWARE_ENV, Transport, cuda_aware_mpi, transport
from hpcdl.comm.window import SharedCounters
from hpcdl.comm.world import World

__all__ = [
    "CUDA_AWARE_ENV", "EXIT_ERROR", "EXIT_REQUEUE", "SUMMABLE", "Op", "Request", "SharedCounters", "Transport",
    "World", "abort", "bindings_version", "cuda_aware_mpi", "init", "library_version", "mpi", "mpi_type",
    "rank_ranges", "testall", "thread_multiple", "transport", "waitall", "waitany",
]  # fmt: skip
