"""Do claims from the dynamic schedule's shared counter go through while rank 0 computes outside MPI?

Run under mpiexec -n 2 by tests/test_infer.py. Rank 0 (the window's host) spends BUSY_S in Python without any MPI
call; meanwhile rank 1 claims 5 times and prints the slowest claim's seconds as JSON.
"""

import json
import time

import hpcdl
from hpcdl.infer.schedule import NEXT_CHUNK, SharedCounters

BUSY_S = 1.5
world = hpcdl.init(threads=1)
counters = SharedCounters(world.comm)
if world.rank == 0:
    began = time.perf_counter()
    while time.perf_counter() - began < BUSY_S:
        sum(range(10_000))  # busy, and never inside MPI
else:
    time.sleep(0.2)  # rank 0 is busy by now
    waits = []
    for _ in range(5):
        began = time.perf_counter()
        counters.add(NEXT_CHUNK, 1)
        waits.append(time.perf_counter() - began)
    print(json.dumps({"slowest_claim_s": max(waits)}), flush=True)
counters.close()
