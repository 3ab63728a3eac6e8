"""Run under mpiexec: rank r's clock runs 1,000 x r seconds ahead; the merged trace must line the ranks up."""

from __future__ import annotations

import sys
import time

from hpcdl import comm, trace

world = comm.init(threads=1)
skew = 1000.0 * world.rank
trace.clock = lambda: time.perf_counter() + skew
trace.start()
for i in range(3):
    world.comm.Barrier()  # every rank leaves within microseconds of the others
    trace.record(f"after barrier {i}", trace.clock(), 1e-4)
    time.sleep(0.05)
trace.finish(world, sys.argv[1])
