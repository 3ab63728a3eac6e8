"""Models of every floating dtype, through each entry point, equal one process (run under mpiexec).

Entry points: the config (hpcdl.train.train, what `hpcdl train` runs), hpcdl.DataParallel and
hpcdl.horovod.DistributedOptimizer. Dtypes: float64, float32, float16, bfloat16 and a model
mixing float64 and float32 layers. Each trains STEPS SGD steps on global batches of BATCH and
is compared with plain PyTorch on the whole batch in one process, in the same dtype.
Rank 0 prints one JSON line per case, then the script exits 1 if any case is off.

    mpiexec -n 3 python tests/scripts/dtype_check.py DATA.h5 RUN_FOLDER
"""

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the reference oracle

from dtype_models import mixed  # noqa: E402

import hpcdl  # noqa: E402
import hpcdl.horovod as hvd  # noqa: E402
from hpcdl import checkpoint, config  # noqa: E402
from hpcdl.config import ModelConfig  # noqa: E402
from hpcdl.models import build, torch_dtype  # noqa: E402
from hpcdl.train import train  # noqa: E402

from reference import reference_train  # noqa: E402

STEPS, BATCH, LR, HIDDEN = 4, 48, 0.05, 16
# Largest parameter difference allowed after STEPS steps: the dtype's rounding of differently ordered sums.
TOLERANCE = {"float64": 1e-12, "float32": 1e-6, "mixed": 1e-6, "float16": 2e-3, "bfloat16": 1e-2}
KINDS = ("float64", "float32", "float16", "bfloat16", "mixed")


def input_dtype(kind: str) -> torch.dtype:
    """The dtype the model's first layer takes (the mixed model starts in float64)."""
    return torch.float64 if kind == "mixed" else torch_dtype(kind)


def builder(kind: str):
    """(feature_shape, classes, seed) -> the model, as a user's code and hpcdl's config both build it."""

    def make(shape: tuple[int, ...], classes: int, seed: int) -> torch.nn.Module:
        if kind == "mixed":
            torch.manual_seed(seed)
            return mixed(shape, classes, HIDDEN)
        return build(ModelConfig(name="mlp", hidden=[HIDDEN]), shape, classes, seed, dtype=torch_dtype(kind))

    return make


def max_error(actual: dict, expected: dict) -> float:
    """The largest absolute difference over every tensor of two state dicts (in float64)."""
    assert actual.keys() == expected.keys(), (actual.keys(), expected.keys())
    return max(float((actual[k].double() - expected[k].double()).abs().max()) for k in expected)


def by_config(kind: str, runs: Path, world) -> dict | None:
    """`hpcdl train`'s loop from a config; the final checkpoint's model (on rank 0)."""
    run_dir = runs / f"config-{kind}-{world.size}"
    model = ["model.factory='dtype_models:mixed'", f"model.kwargs={{hidden = {HIDDEN}}}", "model.dtype='float64'"]
    if kind != "mixed":
        model = [f"model.hidden=[{HIDDEN}]", f"model.dtype='{kind}'"]
    sets = [
        f"data.path='{DATA}'", f"run.dir='{run_dir}'", f"train.batch_size={BATCH}", f"train.max_steps={STEPS}",
        "train.epochs=100", f"train.lr={LR}", "run.progress=false", *model,
    ]  # fmt: skip
    train(config.load("synthetic-mlp", sets), world)
    return checkpoint.load(checkpoint.resolve("latest", run_dir))["model"] if world.is_root else None


def own_loop(kind: str, world, wrap) -> dict:
    """A user's loop: this rank's share of each global batch, mean loss, SGD; `wrap` makes it distributed."""
    with h5py.File(DATA) as f:
        x, y = torch.from_numpy(f["train/x"][:]).to(input_dtype(kind)), torch.from_numpy(f["train/y"][:])
        classes = int(f.attrs["num_classes"])
    model = builder(kind)(tuple(x.shape[1:]), classes, 0)
    forward, optimizer = wrap(model)
    order = np.random.default_rng([0, 0]).permutation(len(y))  # the reference's order (epoch 0)
    for step in range(STEPS):
        mine = np.array_split(order[step * BATCH : (step + 1) * BATCH], world.size)[world.rank]
        optimizer.zero_grad()
        F.cross_entropy(forward(x[mine]), y[mine]).backward()  # equal shares: the mean of means is the mean
        optimizer.step()
    return model.state_dict()


def data_parallel(model):
    wrapped = hpcdl.DataParallel(model)
    return wrapped, torch.optim.SGD(wrapped.parameters(), lr=LR, momentum=0.9)


def horovod(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model, optimizer


DATA, RUNS = sys.argv[1], Path(sys.argv[2])
world = hpcdl.init()
hvd.init()
failed = 0
for kind in KINDS:
    expected = reference_train(DATA, builder(kind), seed=0, batch=BATCH, steps=STEPS, lr=LR, dtype=input_dtype(kind))
    results = {
        "config": by_config(kind, RUNS, world),
        "hpcdl.DataParallel": own_loop(kind, world, data_parallel),
        "hpcdl.horovod": own_loop(kind, world, horovod),
    }
    if world.is_root:
        for entry, state in results.items():
            error = max_error(state, expected)
            ok = error <= TOLERANCE[kind]
            failed += not ok
            print(json.dumps({"entry": entry, "dtype": kind, "ranks": world.size, "max_error": error, "ok": ok}))
sys.exit(1 if world.comm.bcast(failed, root=0) else 0)
