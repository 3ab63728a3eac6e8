"""hpcdl: MPI-parallel deep learning on HDF5 data, from a laptop to a Slurm cluster.

From your own script (run it under `mpirun -n N python script.py`):

    import hpcdl
    world = hpcdl.init()                                   # rank, size, local_rank, node, split(...)
    loader, info = hpcdl.data.open("data.h5", "train", batch_size=256, seed=0)
    model = hpcdl.DataParallel(my_model, bucket_mb=25, compression="none")
    hpcdl.fit(my_model, "data.h5", epochs=5, lr=0.05)     # or the whole command-line loop
    hpcdl.predict("runs/mine", "data.h5", "val", out="preds.h5")   # score a split on every rank

Names are imported on first use, so `import hpcdl` neither starts MPI nor loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hpcdl import checkpoint, data, horovod, metrics
    from hpcdl.api import DataParallel, fit
    from hpcdl.comm import World, init
    from hpcdl.infer.engine import predict
    from hpcdl.parallel.pipeline import Pipeline

# Public name -> (module, attribute); resolved lazily by __getattr__.
_EXPORTS = {
    "init": ("hpcdl.comm", "init"),
    "DataParallel": ("hpcdl.api", "DataParallel"),
    "fit": ("hpcdl.api", "fit"),
    "predict": ("hpcdl.infer.engine", "predict"),
    "World": ("hpcdl.comm", "World"),
    "Pipeline": ("hpcdl.parallel.pipeline", "Pipeline"),
}
_SUBMODULES = ("checkpoint", "data", "horovod", "metrics")

__all__ = [
    "DataParallel", "Pipeline", "World", "checkpoint", "data", "fit", "horovod", "init", "metrics", "predict",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"hpcdl.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hpcdl' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
