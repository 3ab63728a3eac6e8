"""What hpcdl.horovod does not offer: each refusal raises NotOffered (an HpcdlError), naming what to use."""

from __future__ import annotations

from typing import Any, NoReturn

from hpcdl.horovod.errors import NotOffered

# Horovod names without an hpcdl equivalent -> what to use instead.
NOT_OFFERED = {
    "SyncBatchNorm": "torch.nn.BatchNorm (statistics per rank) or torch.nn.GroupNorm",
    "start_timeline": "hpcdl.metrics.PhaseTimer or the time split `hpcdl train` prints",
    "stop_timeline": "hpcdl.metrics.PhaseTimer or the time split `hpcdl train` prints",
    "elastic": "checkpoints (hpcdl.checkpoint) and `hpcdl train --resume` at any number of ranks",
    "run": "mpirun -n N python your_script.py (or srun / sbatch)",
}


def not_offered(what: str, instead: str) -> NoReturn:
    """Raise the refusal for `what`, naming `instead`."""
    raise NotOffered(f"hpcdl.horovod: {what} is not offered by hpcdl; use {instead} instead")


class _NotOffered:
    """Stands for a Horovod name we lack: calling it, or any attribute of it, says what to use instead."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        not_offered(f"hvd.{self._name}", NOT_OFFERED[self._name])

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # introspection (copy, inspect) sees an ordinary object
            raise AttributeError(attribute)
        not_offered(f"hvd.{self._name}.{attribute}", NOT_OFFERED[self._name])


def refused_attribute(name: str) -> _NotOffered:
    """The package's `__getattr__`: a _NotOffered for a Horovod name we lack, AttributeError for any other."""
    if name in NOT_OFFERED:
        return _NotOffered(name)
    raise AttributeError(f"module 'hpcdl.horovod' has no attribute {name!r}")
