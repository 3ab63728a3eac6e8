"""hpcdl.fit with the user's own loss, optimizer, scheduler and callbacks (run by tests/test_training_essentials.py).

Usage: fit_parts.py DATA.h5 RUN_DIR. Each rank writes what its callbacks saw to RUN_DIR/callbacks-rankK.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import hpcdl
from hpcdl.config import ModelConfig
from hpcdl.models import build

data, run_dir = sys.argv[1], Path(sys.argv[2])


class Recorder:
    """Keeps the step and epoch of every record it is given."""

    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step_end(self, record):
        self.steps.append(record["step"])

    def on_epoch_end(self, record):
        self.epochs.append(record["epoch"])


hpcdl.init(threads=1)  # fit's world is this one
recorder = Recorder()
model = build(ModelConfig(name="mlp", hidden=[16, 12, 8]), (20,), 4, seed=0)
hpcdl.fit(
    model,
    data,
    loss_fn=lambda outputs, targets: F.cross_entropy(outputs, targets, label_smoothing=0.1),
    optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
    scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5),
    callbacks=[recorder],
    batch_size=48,
    max_steps=12,
    epochs=100,
    log_every=3,
    run_dir=str(run_dir),
    progress=False,
)
rank = hpcdl.init().rank
(run_dir / f"callbacks-rank{rank}.json").write_text(json.dumps({"steps": recorder.steps, "epochs": recorder.epochs}))
