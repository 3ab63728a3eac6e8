"""What MPI moves: the one dtype map (torch dtype -> MPI datatype), memory as mpi4py's buffers, reductions by name."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from hpcdl.comm.library import mpi
from hpcdl.comm.transport import transport
from hpcdl.errors import HpcdlError

# Memory MPI reads or writes: a numpy array (mpi4py maps its dtype) or a tensor (through the dtype map below).
Memory = np.ndarray | torch.Tensor
# A reduction over the ranks, by name.
Op = Literal["sum", "max", "min", "product"]
_MPI_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "product": "PROD"}

# torch dtype -> name of the MPI datatype that carries it. The one dtype map: every module asks `mpi_type`.
# bfloat16 travels as 16-bit words: MPI has no bfloat16 arithmetic, so it can be moved but not summed.
_MPI_TYPES = {
    torch.float64: "DOUBLE",
    torch.float32: "FLOAT",
    torch.float16: "FLOAT16_T",
    torch.bfloat16: "INT16_T",
    torch.int64: "INT64_T",
    torch.int32: "INT32_T",
    torch.int16: "INT16_T",
    torch.int8: "INT8_T",
    torch.uint8: "UINT8_T",
    torch.bool: "C_BOOL",
}
# Floating dtypes MPI can sum as they are; others are summed in a wider type by the caller.
SUMMABLE = (torch.float64, torch.float32, torch.float16)


def mpi_type(dtype: torch.dtype) -> Any:
    """The MPI datatype that carries tensors of `dtype` (bfloat16 as raw 16-bit words)."""
    name = _MPI_TYPES.get(dtype)
    kind = getattr(mpi(), name, None) if name else None
    if kind is None or kind == mpi().DATATYPE_NULL:
        raise HpcdlError(f"tensors of dtype {dtype} cannot travel through MPI here (supported: {_supported()})")
    return kind


def _supported() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in _MPI_TYPES)


def mpi_op(op: Op) -> Any:
    """The MPI reduction named `op`."""
    return getattr(mpi(), _MPI_OPS[op])


def as_buffer(tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A contiguous tensor's memory for MPI without a copy (bfloat16 as its bits): a numpy view of a CPU tensor;
    a GPU tensor itself, which mpi4py reads through `__cuda_array_interface__` (only for CUDA-aware MPI:
    others get host copies from `Transport`)."""
    if not tensor.is_contiguous():
        raise ValueError("MPI buffers must be contiguous tensors")
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the bits; only valid for copies, not reductions.
        tensor = tensor.view(torch.int16)
    return tensor.detach() if tensor.is_cuda else tensor.numpy()


def buffer(tensor: torch.Tensor) -> list:
    """[memory, MPI datatype] of a contiguous tensor: what mpi4py's upper-case calls take."""
    return [as_buffer(readable(tensor)), mpi_type(tensor.dtype)]


def parts(tensor: torch.Tensor, counts: list[int]) -> list:
    """[memory, elements per rank, MPI datatype] of a tensor cut in per-rank parts: what the v-collectives take."""
    return [as_buffer(readable(tensor)), counts, mpi_type(tensor.dtype)]


def mpi_buffer(memory: Memory) -> np.ndarray | list:
    """What mpi4py's upper-case calls take for `memory`: an array as it is, a tensor as [memory, datatype]."""
    return memory if isinstance(memory, np.ndarray) else buffer(memory)


def readable(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, if MPI can read its memory as it is: device memory reaches MPI one way, through `Transport`."""
    if tensor.is_cuda and transport(tensor.device).staged:
        raise ValueError(f"MPI cannot read {tensor.device} memory here: stage the tensor through `Transport`")
    return tensor
