"""Run `hpcdl infer/evaluate` with each bad command line in turn, in one job (run by tests/test_infer.py).

Usage: infer_bad_inputs.py CASES.json, a list of argument lists. Before each case rank 0 writes `@@case K` to
stderr; each rank prints `@@exit K RANK STATUS` to stdout: the status it would have exited with (sys.exit inside
World.agree, caught here so that the next case can run in the same job).
"""

import json
import sys

import hpcdl
from hpcdl.cli import main

world = hpcdl.init(threads=1)
for number, argv in enumerate(json.loads(open(sys.argv[1]).read())):
    world.comm.Barrier()
    if world.is_root:
        print(f"@@case {number}", file=sys.stderr, flush=True)
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    sys.stdout.write(f"@@exit {number} {world.rank} {status}\n")
    sys.stdout.flush()
