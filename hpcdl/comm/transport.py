"""How a device's tensors reach MPI: as they are (CPU; a GPU with CUDA-aware MPI) or staged through host memory.

MPI reads GPU memory directly only when the MPI library is CUDA-aware (asked of the library itself, or
`HPCDL_CUDA_AWARE_MPI=0|1`); otherwise a `Transport` stages each buffer through pinned host memory with copies
on a side stream, so a bucket's copy overlaps the next bucket's backward. On CPU the same code runs with plain
copies, which is how the staging path is tested without a GPU.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

from hpcdl.comm.library import mpi

CUDA_AWARE_ENV = "HPCDL_CUDA_AWARE_MPI"  # 1: hand GPU buffers to MPI; 0: stage every buffer through a host copy


@lru_cache(maxsize=1)
def cuda_aware_mpi() -> bool:
    """Whether the MPI library reads and writes GPU memory (its own query; `HPCDL_CUDA_AWARE_MPI` overrides)."""
    override = os.environ.get(CUDA_AWARE_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    try:
        library = ctypes.CDLL(mpi().__file__)  # its symbols include the MPI library it links
    except OSError:
        return False
    query = getattr(library, "MPIX_Query_cuda_support", None)  # Open MPI, and MPICH since 4.0
    if query is not None and query() == 1:
        return True
    gpu_query = getattr(library, "MPIX_GPU_query_support", None)  # MPICH: (MPIX_GPU_SUPPORT_CUDA = 0, &flag)
    if gpu_query is not None:
        supported = ctypes.c_int(0)
        if gpu_query(0, ctypes.byref(supported)) == 0 and supported.value:
            return True
    return False


class Transport:
    """How tensors on `device` reach MPI: as they are (CPU; a GPU with CUDA-aware MPI) or staged through host memory.

    Staged, `to_host` copies on a side stream and returns an event to poll, and `from_host` copies back on
    the same stream with the compute stream made to wait; on CPU (`staged` forced, for tests) the copies are
    plain and immediate. Direct on a GPU, `to_host` returns an event on the compute stream: MPI may read
    the buffer once the kernels that wrote it have finished.
    """

    def __init__(self, device: torch.device, staged: bool | None = None):
        self.device = device
        gpu = device.type == "cuda"
        if staged is None:  # HPCDL_CUDA_AWARE_MPI=0 stages on any device: how tests run the GPU path on CPU
            staged = os.environ.get(CUDA_AWARE_ENV, "").strip() == "0" or (gpu and not cuda_aware_mpi())
        self.staged = staged
        self.stream = torch.cuda.Stream(device) if gpu and self.staged else None

    @property
    def name(self) -> str:
        """'host' (CPU), 'direct' (CUDA-aware MPI) or 'staged' (pinned host copies): for the summary."""
        if self.staged:
            return "staged"
        return "direct" if self.device.type == "cuda" else "host"

    def mirror(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor MPI works on for `tensor`: itself, or a host buffer of its shape (pinned beside a GPU)."""
        if not self.staged:
            return tensor
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.stream is not None)

    def to_host(self, tensor: torch.Tensor, mirror: torch.Tensor) -> torch.cuda.Event | None:
        """Start making `tensor`'s values readable by MPI in `mirror`; an event to poll, or None when already so."""
        if self.device.type != "cuda":
            if mirror is not tensor:
                mirror.copy_(tensor)
            return None
        done = torch.cuda.Event()
        if self.stream is None:
            done.record(torch.cuda.current_stream(self.device))
            return done
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            mirror.copy_(tensor, non_blocking=True)
            done.record(self.stream)
        return done

    @staticmethod
    def ready(event: torch.cuda.Event | None) -> bool:
        """Whether MPI may read the buffer now."""
        return event is None or event.query()

    @staticmethod
    def wait(event: torch.cuda.Event | None) -> None:
        """Block until MPI may read the buffer."""
        if event is not None:
            event.synchronize()

    def from_host(self, mirror: torch.Tensor, tensor: torch.Tensor) -> None:
        """Put what MPI wrote into `mirror` back into `tensor`, before any later work on the compute stream."""
        if mirror is tensor:
            return
        if self.stream is None:
            tensor.copy_(mirror)
            return
        with torch.cuda.stream(self.stream):
            tensor.copy_(mirror, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    @contextmanager
    def for_mpi(self, tensor: torch.Tensor, *, read: bool = True, write: bool = True) -> Iterator[torch.Tensor]:
        """A blocking collective's view of `tensor`: its values in (`read`), MPI's results back out (`write`)."""
        mirror = self.mirror(tensor)
        if read:
            self.wait(self.to_host(tensor, mirror))
        elif self.device.type == "cuda" and mirror is tensor:
            torch.cuda.current_stream(self.device).synchronize()  # nothing pending may write it under MPI
        yield mirror
        if write:
            self.from_host(mirror, tensor)


@lru_cache(maxsize=8)
def transport(device: torch.device) -> Transport:
    """The one transport of a device in this process (its side stream shared by every user)."""
    return Transport(device)
