"""The global pruning threshold of the digits MLP as built by one layout: prints rank 0's figures as JSON.

Usage: prune_threshold.py DATA SPARSITY [SECTION.KEY=VALUE ...] (under mpiexec; the layout from the --set values).
"""

import json
import sys

import hpcdl.comm
from hpcdl import config
from hpcdl.compress.prune import count, global_threshold, magnitude
from hpcdl.data.schema import validate
from hpcdl.parallel import make_strategy
from hpcdl.parallel.layout import Layout
from hpcdl.preflight import build_model

data, sparsity, sets = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
world = hpcdl.comm.init(threads=1)
cfg = config.load("digits-mlp", [f"data.path='{data}'", "model.hidden=[48, 40]", *sets])
info = validate(data)
layout = Layout.from_config(cfg, world.size)
strategy = make_strategy(cfg, layout, world, build_model(cfg, info, layout, world), info.feature_shape)
parts = strategy.prune_weights()
threshold, k = global_threshold(parts, sparsity, strategy.split_group)
pruned = count(parts, strategy.split_group, lambda t: magnitude(t) <= threshold)
weights = count(parts, strategy.split_group)
if world.is_root:
    print(json.dumps({"threshold": float(threshold).hex(), "k": k, "pruned": pruned, "weights": weights}))
