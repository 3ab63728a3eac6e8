"""Cross-rank agreement on a collective's metadata before its data moves, as Horovod's coordinator checks.

Each rank of the set sends one small int64 row (op, dtype, root, reduction, shape, splits) in a
non-blocking allgather on the set's agreement communicator; when it arrives every rank sees the same
table, so a disagreement raises HorovodInternalError on every rank and no data collective starts with
mismatched sizes (no hang). A rank in `join` sends "joined" rows and serves the others' allreduces
with zeros until every rank has joined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from hpcdl.comm import Request, waitall
from hpcdl.horovod.errors import ArgumentError, HorovodInternalError
from hpcdl.horovod.handles import Handle, agreeing
from hpcdl.horovod.process_sets import ProcessSet

OPS = ("allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "join")
DTYPES = (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.bool,
)  # fmt: skip
REDUCTIONS = ("none", "sum", "min", "max", "product")
MAX_DIMS = 12
# Row layout: op, dtype, root (for a joined row: the agreement it joined at), reduction, ndim,
# shape (MAX_DIMS, zero-padded), then one split per rank of the set.
OP, DTYPE, ROOT, REDUCTION, NDIM, SHAPE = 0, 1, 2, 3, 4, 5
SPLITS = SHAPE + MAX_DIMS
# The columns each collective needs equal: allgather and alltoall let dim 0 differ.
EVERYTHING = [OP, DTYPE, REDUCTION, NDIM, *range(SHAPE, SPLITS)]
AFTER_DIM_0 = [OP, DTYPE, NDIM, *range(SHAPE + 1, SPLITS)]
WITH_ROOT = [*EVERYTHING, ROOT]


def _row(
    op: str, tensor: torch.Tensor | None, ranks: int, root: int = 0, reduction: str = "none", splits: Sequence[int] = ()
) -> np.ndarray:
    row = np.zeros(SPLITS + ranks, dtype=np.int64)
    row[[OP, ROOT, REDUCTION]] = OPS.index(op), root, REDUCTIONS.index(reduction)
    if tensor is not None:
        if tensor.ndim > MAX_DIMS:
            raise ArgumentError(f"hpcdl.horovod.{op}: tensors of more than {MAX_DIMS} dimensions are not supported")
        if tensor.dtype not in DTYPES:
            raise ArgumentError(f"hpcdl.horovod.{op}: dtype {tensor.dtype} is not supported")
        row[[DTYPE, NDIM]] = DTYPES.index(tensor.dtype), tensor.ndim
        row[SHAPE : SHAPE + tensor.ndim] = tensor.shape
    row[SPLITS : SPLITS + len(splits)] = splits
    return row


def _shape(row: np.ndarray) -> tuple[int, ...]:
    return tuple(int(d) for d in row[SHAPE : SHAPE + row[NDIM]])


def _describe(row: np.ndarray) -> str:
    if OPS[row[OP]] == "join":
        return "joined"
    return f"{OPS[row[OP]]} ({REDUCTIONS[row[REDUCTION]]}) of {DTYPES[row[DTYPE]]} {_shape(row)} (root {row[ROOT]})"


def _servable(op: str, reduction: str) -> bool:
    """Whether a collective can run while some ranks have joined: a joined rank adds zeros to a sum allreduce."""
    return op == "allreduce" and reduction == "sum"


def _start(pset: ProcessSet, mine: np.ndarray) -> tuple[Request, np.ndarray]:
    """Post this rank's row; the table fills in when the request completes."""
    table = np.empty((pset.size(), mine.size), dtype=np.int64)
    request = pset.agreement.iallgather(mine, table)
    pset.agreements += 1
    return request, table


def agreed(
    pset: ProcessSet,
    op: str,
    tensor: torch.Tensor,
    columns: list[int],
    then: Callable[[np.ndarray], Handle],
    root: int = 0,
    reduction: str = "none",
    splits: Sequence[int] = (),
) -> Handle:
    """Start agreeing on `tensor`'s metadata over the set; when every row is in, `then(table)` starts the data."""
    mine = _row(op, tensor, pset.size(), root, reduction, splits)
    request, table = _start(pset, mine)

    def check() -> Handle:
        active = table[table[:, OP] != OPS.index("join")]
        joined = len(active) < len(table)
        if (active[:, columns] != active[0, columns]).any() or (joined and not _servable(op, reduction)):
            found = "; ".join(f"rank {r}: {_describe(row)}" for r, row in zip(pset.ranks, table))
            why = "only a sum or average allreduce can run while ranks have joined" if joined else "ranks disagree"
            raise HorovodInternalError(f"hpcdl.horovod.{op}: {why} ({found})")
        return then(table)

    return agreeing(Handle(request, check, keep=[mine, table]))


def join_and_serve(pset: ProcessSet) -> int:
    """Take part in the others' agreements, adding zeros to their allreduces, until every rank has joined.

    Returns the rank that joined last (the highest of those joining at the same agreement).
    """
    serving, joined_at = [], pset.agreements
    while True:
        request, table = _start(pset, _row("join", None, pset.size(), root=joined_at))
        request.wait()
        joined = table[:, OP] == OPS.index("join")
        if joined.all():
            break
        active = table[~joined]
        # The active ranks move data only when they agree and it is a sum allreduce (check() in agreed): this
        # rank then adds zeros; otherwise they raise and nothing moves.
        if (active[:, EVERYTHING] == active[0, EVERYTHING]).all() and _servable(
            OPS[active[0, OP]], REDUCTIONS[active[0, REDUCTION]]
        ):
            zeros = torch.zeros(_shape(active[0]), dtype=DTYPES[active[0, DTYPE]])
            serving.append((zeros, pset.data.iallreduce(zeros)))
    waitall(r for _, r in serving)
    last_round = table[:, ROOT].max()
    return int(np.flatnonzero(table[:, ROOT] == last_round)[-1])
