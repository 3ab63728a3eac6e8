"""Do claims from the dynamic schedule's shared counter go through while rank 0 computes outside MPI?

Run under mpiexec -n 2 by tests/test_infer.py. Rank 0 (the window's host) spends BUSY_S in Python without any MPI
call, then prints when it stopped; meanwhile rank 1 claims 5 times and prints when its claims were done (wall
clock of this one host): claims that needed rank 0 inside MPI could not end before rank 0's busy time does.
"""

import json
import time

import hpcdl
from hpcdl.comm import SharedCounters
from hpcdl.infer.schedule import NEXT_CHUNK

BUSY_S = 1.5
world = hpcdl.init(threads=1)
counters = SharedCounters(world, slots=2)
if world.rank == 0:
    began = time.perf_counter()
    while time.perf_counter() - began < BUSY_S:
        sum(range(10_000))  # busy, and never inside MPI
    print(json.dumps({"busy_until": time.time()}), flush=True)
else:
    time.sleep(0.2)  # rank 0 is busy by now
    for _ in range(5):
        counters.add(NEXT_CHUNK, 1)
    print(json.dumps({"claims_done": time.time()}), flush=True)
counters.close()
