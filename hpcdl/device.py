"""Where a rank computes (`train.device`: auto | cpu | cuda) and how its tensors reach MPI.

Each rank takes one GPU: its node-local rank's among the GPUs it sees (one, when the launcher
bound it, as `slurm/train-gpu.sbatch` does). MPI reads GPU memory directly only when the MPI
library is CUDA-aware (asked of the library itself, or `HPCDL_CUDA_AWARE_MPI=0|1`); otherwise a
`Transport` stages each buffer through pinned host memory with copies on a side stream, so a
bucket's copy overlaps the next bucket's backward. On CPU the same code runs with plain copies,
which is how the staging path is tested without a GPU.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

from hpcdl.config import DEVICES
from hpcdl.errors import ConfigError, HpcdlError

CPU = torch.device("cpu")
CUDA_AWARE_ENV = "HPCDL_CUDA_AWARE_MPI"  # 1: hand GPU buffers to MPI; 0: stage every buffer through a host copy


def visible_gpus() -> int:
    """How many GPUs this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_index(local_rank: int, gpus: int) -> int:
    """The GPU a rank takes among the `gpus` it sees: its node-local rank's, ranks sharing when they outnumber GPUs."""
    return local_rank % gpus


def no_gpu_reason() -> str:
    """Why no GPU is visible, in words a user can act on."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is empty"
    return "torch.cuda.is_available() is False (no GPU or driver on this node)"


def no_gpu_message(what: str, fix: str = 'train.device = "cpu"') -> str:
    """The one line said when `what` needs a GPU and none is found."""
    return f"{what}, but no GPU was found: {no_gpu_reason()}; use {fix} or run on a GPU node"


def select_device(requested: str, local_rank: int, gpus: int | None = None) -> torch.device:
    """The device of a rank for `train.device = requested` (`gpus`: how many it sees; asked of torch if None)."""
    if requested not in DEVICES:
        raise HpcdlError(f"train.device must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "cpu":
        return CPU
    gpus = visible_gpus() if gpus is None else gpus
    if gpus == 0:
        if requested == "cuda":
            raise HpcdlError(no_gpu_message('train.device = "cuda"'))
        return CPU
    return torch.device("cuda", gpu_index(local_rank, gpus))


def describe(device: torch.device) -> str:
    """'cuda:1 (NVIDIA H200)' or 'cpu': what a rank prints at start and the summary records."""
    if device.type != "cuda":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(device)})"


@lru_cache(maxsize=1)
def cuda_aware_mpi() -> bool:
    """Whether the MPI library reads and writes GPU memory (its own query; `HPCDL_CUDA_AWARE_MPI` overrides)."""
    override = os.environ.get(CUDA_AWARE_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    from mpi4py import MPI

    try:
        library = ctypes.CDLL(MPI.__file__)  # its symbols include the MPI library it links
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


class BatchCopier:
    """Batches moved to a GPU as they are loaded: pinned host memory copied on a side stream (in the loader's
    prefetch thread), the compute stream waiting only for the copy of the batch it takes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]:
        """Begin copying features and targets to the device; the device tensors and the copy's event."""
        with torch.cuda.stream(self.stream):
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return x, y, copied

    def finish(self, x: torch.Tensor, y: torch.Tensor, copied: torch.cuda.Event) -> None:
        """Make the compute stream wait for the copy; the memory is kept until that stream's work on it is done."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(copied)
        x.record_stream(stream)
        y.record_stream(stream)


# The modes whose every transfer goes through `Transport` so far; the others train on CPU.
GPU_MODES = ("data", "pipeline", "tensor", "columns")


def run_device(requested: str, mode: str, local_rank: int, notes: list[str]) -> torch.device:
    """The device a training run of `parallel.mode = mode` uses on this rank (checked under agree)."""
    if mode in GPU_MODES:
        return select_device(requested, local_rank)
    if requested == "cuda":
        raise ConfigError(
            f'parallel.mode = "{mode}" trains on CPU only so far: use train.device = "cpu" '
            f"(modes that train on GPUs: {', '.join(GPU_MODES)})"
        )
    if requested == "auto" and visible_gpus():
        notes.append(f'parallel.mode = "{mode}" trains on CPU only so far: the GPUs of this node are not used')
    return CPU


def to_cpu(value):
    """`value` (a tensor, or dicts, lists and tuples of them) with every tensor on the CPU: what checkpoints hold
    and what travels pickled between ranks, whichever GPU each rank uses."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(item) for item in value)
    return value


def placement(world, device: torch.device) -> str:
    """Where the ranks compute, said once at start (a collective): '' when every rank is on the CPU."""
    described = world.comm.allgather(describe(device))
    if all(d == "cpu" for d in described):
        return ""
    ranks = ", ".join(f"rank {r} {d}" for r, d in enumerate(described))
    via = transport(device)
    how = {
        "direct": "MPI is CUDA-aware: buffers go to MPI from GPU memory",
        "staged": "MPI is not CUDA-aware: buffers staged through pinned host memory",
    }.get(via.name, "buffers in host memory")
    return f"devices: {ranks}; {how}"


def device_summary(world, device: torch.device) -> dict:
    """The run summary's proof of where it ran (a collective): each rank's device, transport and peak GPU memory."""
    gpu = device.type == "cuda"
    mine = (describe(device), torch.cuda.max_memory_allocated(device) / 2**20 if gpu else 0.0)
    every = world.comm.allgather(mine)
    figures = {"device": device.type, "mpi_transport": transport(device).name}
    if any(d != "cpu" for d, _ in every):
        figures["devices"] = [d for d, _ in every]
        figures["gpu_memory_peak_mb"] = [round(m, 1) for _, m in every]
    return figures
