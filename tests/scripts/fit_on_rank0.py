"""`hpcdl.fit` on rank 0 only, a misuse that must end the job within the set-up limit, not hang it.

Run under mpiexec: `python tests/scripts/fit_on_rank0.py init-everywhere|init-on-rank-0 DATA RUN_DIR`.
With `init-everywhere` every rank calls `hpcdl.init()` first, so rank 0 waits in `fit`'s first
`World.agree`; with `init-on-rank-0` the other ranks never start hpcdl, so rank 0 waits in `init`.
"""

import sys

import torch
from mpi4py import MPI

import hpcdl

where, data, run_dir = sys.argv[1:4]
if where == "init-everywhere":
    hpcdl.init(threads=1)
if MPI.COMM_WORLD.Get_rank() == 0:
    hpcdl.fit(torch.nn.Linear(64, 10), data, run_dir=run_dir, epochs=1, progress=False)
