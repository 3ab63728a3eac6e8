"""The communication layer: every operation hpcdl uses, as a method of World, on one rank and at three.

Run as a script under mpiexec (by `test_every_operation_at_three_ranks`), it is the worker: each rank checks
what it received, and rank 0 prints one JSON line: each rank's checks that failed.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from hpcdl import comm
from hpcdl.errors import HpcdlError

from conftest import run_mpi

RANKS = 3


def test_every_operation_on_one_rank():
    world = comm.init(threads=1)  # one rank: the same code path as many, with a world of one
    assert world.bcast("x") == "x" and world.allgather(1) == [1] and world.gather(2) == [2]
    tensor, array = torch.arange(4.0), np.array([1, 5], dtype=np.int64)
    world.allreduce_(tensor)
    world.allreduce_(array, "max")
    assert torch.equal(tensor, torch.arange(4.0)) and array.tolist() == [1, 5]
    out, scattered, swapped = torch.empty(4), torch.empty(4), torch.empty(4)
    requests = [
        world.iallreduce(tensor, "product"),
        world.iallgatherv(tensor, out, [4]),
        world.ireduce_scatter(tensor, scattered, [4]),
        world.ialltoallv(tensor, [4], swapped, [4]),
    ]
    comm.waitall(requests)
    assert all(torch.equal(t, torch.arange(4.0)) for t in (out, scattered, swapped))
    sent = world.isend({"a": 1}, dest=0, tag=3)
    assert world.iprobe(tag=3) and world.recv(tag=3) == {"a": 1}
    sent.wait()
    alone, twin = world.alone(), world.dup()
    assert (alone.rank, alone.size, twin.size) == (0, 1, 1)
    twin.free()
    counters = comm.SharedCounters(world, slots=2)
    assert [counters.add(1, 5), counters.add(1, 1), counters.add(0, 0)] == [0, 5, 0]
    counters.close()


def test_the_dtype_map_names_what_mpi_cannot_carry():
    with pytest.raises(HpcdlError, match="complex64 cannot travel through MPI here"):
        comm.mpi_type(torch.complex64)


def test_every_operation_at_three_ranks():
    result = run_mpi(RANKS, __file__, timeout=60)
    assert result.returncode == 0, result.stderr
    failed = json.loads(result.stdout)  # per rank, the checks that failed
    assert failed == [[]] * RANKS, failed


def _checks(world: comm.World) -> dict[str, bool]:
    """Each operation at `RANKS` ranks: whether this rank got what it should."""
    rank, size = world.rank, world.size
    checks = {
        "bcast": world.bcast(rank, root=1) == 1,
        "allgather": world.allgather(rank) == list(range(size)),
        "gather": world.gather(rank) == (list(range(size)) if rank == 0 else None),
    }
    world.send(rank, dest=(rank + 1) % size, tag=1)
    checks["send/recv"] = world.recv((rank - 1) % size, tag=1) == (rank - 1) % size
    sent = world.isend(rank, dest=0, tag=2)
    checks["isend/recv"] = rank != 0 or sorted(world.recv(tag=2) for _ in range(size)) == list(range(size))
    sent.wait()

    summed, highest = torch.full((3,), float(rank)), np.array([rank, -rank])
    world.allreduce_(summed)
    world.allreduce_(highest, "max")
    least = torch.tensor([rank + 1], dtype=torch.int64)
    world.allreduce_(least, "min")
    checks["allreduce_"] = summed.tolist() == [3.0] * 3 and highest.tolist() == [2, 0] and least.item() == 1
    shared = torch.full((2,), float(rank))
    world.broadcast_(shared, root=2)
    checks["broadcast_"] = shared.tolist() == [2.0, 2.0]
    parts = torch.zeros(size * 2)
    parts[2 * rank : 2 * rank + 2] = rank
    world.allgather_(parts)
    checks["allgather_"] = parts.tolist() == [0, 0, 1, 1, 2, 2]

    product, root_value = torch.tensor([rank + 2.0]), torch.tensor([rank], dtype=torch.int32)
    mine, table = np.array([rank, 10 * rank], dtype=np.int64), np.empty((size, 2), dtype=np.int64)
    counts = [r + 1 for r in range(size)]  # rank r gives r + 1 elements
    gathered = torch.empty(sum(counts))
    scattered = torch.empty(counts[rank])
    received = torch.empty(size)
    requests = [
        world.iallreduce(product, "product"),
        world.ibroadcast(root_value, root=1),
        world.iallgather(mine, table),
        world.iallgatherv(torch.full((counts[rank],), float(rank)), gathered, counts),
        world.ireduce_scatter(torch.ones(sum(counts)), scattered, counts),
        world.ialltoallv(torch.full((size,), float(rank)), [1] * size, received, [1] * size),
        world.ibarrier(),
    ]
    comm.waitall(requests)
    checks["iallreduce"] = product.item() == 24.0 and comm.testall(requests)
    checks["ibroadcast"] = root_value.item() == 1
    checks["iallgather"] = table.tolist() == [[r, 10 * r] for r in range(size)]
    checks["iallgatherv"] = gathered.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    checks["ireduce_scatter"] = scattered.tolist() == [3.0] * counts[rank]
    checks["ialltoallv"] = received.tolist() == [0.0, 1.0, 2.0]

    ring, token = torch.empty(1), torch.tensor([float(rank)])
    posted = [world.irecv_buffer(ring, (rank - 1) % size, tag=4), world.isend_buffer(token, (rank + 1) % size, tag=4)]
    checks["waitany"] = comm.waitany(posted) in (0, 1)
    comm.waitall(posted)
    checks["isend_buffer/irecv_buffer"] = ring.item() == (rank - 1) % size
    if rank == 0:
        world.send_buffer(np.array([7], dtype=np.int64), dest=1, tag=5)
    elif rank == 1:
        got = np.zeros(1, dtype=np.int64)
        world.recv_buffer(got, source=0, tag=5)
        checks["send_buffer/recv_buffer"] = got.item() == 7

    pair = world.split(rank // 2)
    twin = pair.dup()
    checks["split/dup"] = (pair.size, twin.allgather(pair.rank)) == ((2, [0, 1]) if rank < 2 else (1, [0]))
    twin.free()
    pair.free()
    checks["alone"] = world.alone().allgather(rank) == [rank]
    counters = comm.SharedCounters(world, slots=1)
    claims = world.allgather([counters.add(0, 1) for _ in range(10)])  # each value before an add: each once
    checks["SharedCounters"] = sorted(c for part in claims for c in part) == list(range(10 * size))
    counters.close()
    return checks


if __name__ == "__main__":
    world = comm.init(threads=1)
    failed = world.gather([name for name, ok in _checks(world).items() if not ok])
    if world.is_root:
        print(json.dumps(failed), flush=True)
    sys.exit(0)
