"""The whole hpcdl training loop for your own model, in one call.

Run (from the repository's root):
    mpirun -n 2 python examples/fit_model.py datasets/digits.h5
"""

import sys

import h5py
import torch
from my_model import mlp

import hpcdl

path = sys.argv[1] if len(sys.argv) > 1 else "datasets/digits.h5"
options = dict(arg.split("=", 1) for arg in sys.argv[2:])  # e.g. run_dir=runs/fit max_steps=12

with h5py.File(path, "r") as f:  # the factory needs the data's shapes; any model of yours will do
    shape, classes = tuple(f.attrs["feature_shape"]), int(f.attrs["num_classes"])
torch.manual_seed(0)
model = mlp(shape, classes, hidden=[64, 32])

summary = hpcdl.fit(
    model,
    path,
    epochs=5,
    batch_size=64,
    lr=0.05,
    run_dir=options.get("run_dir", "runs/fit"),
    max_steps=int(options.get("max_steps", 0)),
    progress=False,
)
hpcdl.init().log(f"fit: val_acc {summary['val_acc']:.3f} after {summary['steps']} steps")
