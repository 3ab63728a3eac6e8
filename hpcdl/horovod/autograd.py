"""Collectives as autograd functions: each backward is the collective Horovod pairs with the forward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class _Collective(torch.autograd.Function):
    """forward = run(*inputs); backward = gradient(*output_grads), one gradient per input."""

    @staticmethod
    def forward(
        ctx: Any, run: Callable[..., Any], gradient: Callable[..., Sequence[torch.Tensor]], *inputs: Any
    ) -> Any:
        ctx.gradient = gradient
        outputs = run(*inputs)
        # Integer outputs (alltoall's received splits) carry no gradient.
        for out in outputs if isinstance(outputs, tuple) else (outputs,):
            if not out.dtype.is_floating_point:
                ctx.mark_non_differentiable(out)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, None, *ctx.gradient(*grads))


def differentiable(
    run: Callable[..., Any], gradient: Callable[..., Sequence[torch.Tensor]], *inputs: torch.Tensor
) -> Any:
    """run(*inputs), recorded for autograd when an input requires grad; its backward is gradient(*output_grads)."""
    return _Collective.apply(run, gradient, *inputs)
