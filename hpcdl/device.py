"""Where a rank computes (`train.device`: auto | cpu | cuda), and its batches' way to the GPU.

Each rank takes one GPU: its node-local rank's among the GPUs it sees (one, when the launcher
bound it, as `slurm/train-gpu.sbatch` does). How its tensors reach MPI (`Transport`, CUDA-aware
detection) is the communication layer's (`hpcdl.comm.transport`); the names stay importable from here.
"""

from __future__ import annotations

import os

import torch

from hpcdl.comm import World, transport
from hpcdl.comm.transport import CUDA_AWARE_ENV, Transport, cuda_aware_mpi  # noqa: F401 - hpcdl.device's names still
from hpcdl.config import DEVICES
from hpcdl.errors import ConfigError, HpcdlError

CPU = torch.device("cpu")


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


def placement(world: World, device: torch.device) -> str:
    """Where the ranks compute, said once at start (a collective): '' when every rank is on the CPU."""
    described = world.allgather(describe(device))
    if all(d == "cpu" for d in described):
        return ""
    ranks = ", ".join(f"rank {r} {d}" for r, d in enumerate(described))
    via = transport(device)
    how = {
        "direct": "MPI is CUDA-aware: buffers go to MPI from GPU memory",
        "staged": "MPI is not CUDA-aware: buffers staged through pinned host memory",
    }.get(via.name, "buffers in host memory")
    return f"devices: {ranks}; {how}"


def device_summary(world: World, device: torch.device) -> dict:
    """The run summary's proof of where it ran (a collective): each rank's device, transport and peak GPU memory."""
    gpu = device.type == "cuda"
    mine = (describe(device), torch.cuda.max_memory_allocated(device) / 2**20 if gpu else 0.0)
    every = world.allgather(mine)
    figures = {"device": device.type, "mpi_transport": transport(device).name}
    if any(d != "cpu" for d, _ in every):
        figures["devices"] = [d for d, _ in every]
        figures["gpu_memory_peak_mb"] = [round(m, 1) for _, m in every]
    return figures
