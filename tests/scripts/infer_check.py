"""Score a split with hpcdl.predict under both schedules (run under mpiexec by tests/test_infer.py).

Usage: infer_check.py DATA FOLDER [CHECKPOINT...]. The module is MLP(20, [16], 4) seeded with 0; it scores the
labelled split `val` into FOLDER/<schedule>.h5 and the features-only split `features` in memory, and each
checkpoint (a run folder) into FOLDER/<run name>.h5. Rank 0 prints one JSON line of what each pass reported.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

import hpcdl
from hpcdl.models import MLP

data, folder, checkpoints = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
world = hpcdl.init(threads=1)
torch.manual_seed(0)
model = MLP(20, [16], 4)
report = {}
for schedule in ("static", "dynamic"):
    out = folder / f"{schedule}.h5"
    scored = hpcdl.predict(
        model, data, "val", out=out, outputs=("class", "probs", "logits"), schedule=schedule, batch=8
    )
    report[schedule] = {"rows_per_rank": scored.rows_per_rank, "metrics": scored.metrics, "out": str(scored.out)}
    memory = hpcdl.predict(model, data, "features", outputs="logits", schedule=schedule, batch=8)
    if world.is_root:
        np.savez(folder / f"features-{schedule}.npz", **memory.arrays)
    report[f"features-{schedule}"] = {"rows_per_rank": memory.rows_per_rank, "metrics": memory.metrics}
for run in checkpoints:
    scored = hpcdl.predict(run, data, "val", out=folder / f"{Path(run).name}.h5", outputs="logits", schedule="dynamic")
    report[Path(run).name] = {"rows_per_rank": scored.rows_per_rank, "metrics": scored.metrics}
if world.is_root:
    print(json.dumps(report))
