"""Print, as one JSON line per rank, the place hpcdl.init exports for libraries that read the environment."""

import json
import os
import sys

import hpcdl

world = hpcdl.init(threads=1)
exported = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
sys.stdout.write(json.dumps({"rank": world.rank, "size": world.size, **exported}) + "\n")  # one write: lines stay whole
