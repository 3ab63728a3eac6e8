"""Horovod's gradient compression: `hvd.Compression.none` and `hvd.Compression.fp16`.

Each compressor's `wire` names the gradient-sync engine's compression ("none", "fp16"), which
DistributedOptimizer hands to its buckets; the tensor allreduce calls compress/decompress.
"""

from __future__ import annotations

from typing import Any

import torch


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
