"""What hpcdl.horovod does not offer: each refusal raises HpcdlError at call time, naming what to use instead."""

from __future__ import annotations

from typing import Any, NoReturn

from hpcdl.errors import HpcdlError

# Horovod names without an hpcdl equivalent -> what to use instead.
NOT_OFFERED = {
    "SyncBatchNorm": "torch.nn.BatchNorm (statistics per rank) or torch.nn.GroupNorm",
    "ProcessSet": "hpcdl.init().split(color) for a sub-communicator",
    "add_process_set": "hpcdl.init().split(color) for a sub-communicator",
    "remove_process_set": "hpcdl.init().split(color) for a sub-communicator",
    "reducescatter": "hvd.allreduce and keep your rank's rows",
    "grouped_reducescatter": "hvd.allreduce and keep your rank's rows",
    "sparse_allreduce_async": "dense gradients (sparse_as_dense)",
    "start_timeline": "hpcdl.metrics.PhaseTimer or the time split `hpcdl train` prints",
    "stop_timeline": "hpcdl.metrics.PhaseTimer or the time split `hpcdl train` prints",
    "elastic": "checkpoints (hpcdl.checkpoint) and `hpcdl train --resume` at any number of ranks",
    "run": "mpirun -n N python your_script.py (or srun / sbatch)",
}


def not_offered(what: str, instead: str) -> NoReturn:
    """Raise the refusal for `what`, naming `instead`."""
    raise HpcdlError(f"hpcdl.horovod: {what} is not offered by hpcdl; use {instead} instead")


def no_process_set(process_set: Any) -> None:
    """Refuse a process_set= argument (hpcdl's collectives run on the whole world)."""
    if process_set is not None:
        not_offered("process_set=", "hpcdl.init().split(color) and mpi4py on the sub-communicator")


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
