"""Each rank writes where it runs, as hpcdl.init found it, to OUT/rank-K.json (run by tests/test_multinode.py)."""

import json
import os
import socket
import sys
from pathlib import Path

import hpcdl

world = hpcdl.init(threads=1)
place = {
    "hostname": socket.gethostname(),
    "rank": world.rank,
    "local_rank": world.local_rank,
    "local_size": world.local_size,
    "node": world.node,
    "num_nodes": world.num_nodes,
    "hosts": list(world.hosts),
    "env": {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")},
}
(Path(sys.argv[1]) / f"rank-{world.rank}.json").write_text(json.dumps(place))
