"""Library calls with one bad argument each (tests/test_user_errors.py): every rank must end with exit 2.

    mpiexec -n 2 python tests/scripts/bad_library_calls.py CASE [CASE ...]

One case: the call's exit is the process's (the launcher's status). Several: each call's SystemExit is
caught, so one launch tries them all, and rank 0 prints `CASE STATUSES` (every rank's exit status, or
"returned" where the call did not fail). The error lines themselves are the library's, on rank 0's stderr.
"""

import sys
from collections.abc import Callable

from torch import nn

import hpcdl

MISSING = "no-such-file.h5"  # the argument checks come first: the file is never opened


def model() -> nn.Module:
    return nn.Linear(2, 2)


CALLS: dict[str, Callable[[], object]] = {
    "DataParallel module": lambda: hpcdl.DataParallel([1, 2]),
    "DataParallel bucket_mb nan": lambda: hpcdl.DataParallel(model(), bucket_mb=float("nan")),
    "DataParallel bucket_mb 0": lambda: hpcdl.DataParallel(model(), bucket_mb=0),
    "DataParallel compression": lambda: hpcdl.DataParallel(model(), compression="zip"),
    "DataParallel overlap": lambda: hpcdl.DataParallel(model(), overlap="yes"),
    "DataParallel average": lambda: hpcdl.DataParallel(model(), average=1),
    "fit model": lambda: hpcdl.fit(None, MISSING),
    "fit data_path": lambda: hpcdl.fit(model(), 3),
    "fit lr": lambda: hpcdl.fit(model(), MISSING, lr=float("nan")),
    "fit model without parameters": lambda: hpcdl.fit(nn.Flatten(), MISSING),
    "open path": lambda: hpcdl.data.open(None),
    "open split": lambda: hpcdl.data.open(MISSING, "test"),
    "open seed": lambda: hpcdl.data.open(MISSING, seed=-1),
    "open shuffle": lambda: hpcdl.data.open(MISSING, shuffle="yes"),
    "open prefetch": lambda: hpcdl.data.open(MISSING, prefetch=-1),
    "open cache_mb": lambda: hpcdl.data.open(MISSING, cache_mb=float("inf")),
    "open window_blocks": lambda: hpcdl.data.open(MISSING, partition="chunked", window_blocks=0),
}


def status_of(call: Callable[[], object]) -> int | str:
    """The exit status the call ended this rank with, or "returned"."""
    try:
        call()
    except SystemExit as end:
        return end.code
    return "returned"


if __name__ == "__main__":
    cases = sys.argv[1:]
    if len(cases) == 1:
        CALLS[cases[0]]()
        sys.exit("returned")  # not reached when the call fails as it should
    world = hpcdl.init()
    for case in cases:
        statuses = world.comm.allgather(status_of(CALLS[case]))
        if world.is_root:
            print(case, *statuses, flush=True)
