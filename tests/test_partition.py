"""Every sample exactly once per epoch, for any ranks and sizes; global order independent of ranks."""

import numpy as np
import pytest

from hpcdl.data.loader import contiguous_runs
from hpcdl.data.partition import Partition

CASES = [(1, 100, 10), (2, 100, 10), (3, 101, 12), (4, 1797, 64), (4, 65, 64), (5, 23, 5), (7, 1000, 14)]


def plans(scheme, ranks, n, batch, epoch=0, drop_last=False):
    parts = [Partition(n, batch, r, ranks, seed=3, scheme=scheme, drop_last=drop_last) for r in range(ranks)]
    return [p.epoch(epoch) for p in parts]


@pytest.mark.parametrize("scheme", ["global", "block"])
@pytest.mark.parametrize("ranks,n,batch", CASES)
def test_every_sample_once_per_epoch(scheme, ranks, n, batch):
    per_rank = plans(scheme, ranks, n, batch, epoch=2)
    steps = {len(p) for p in per_rank}
    assert steps == {-(-n // batch)}, "every rank must run the same number of steps"
    seen = np.concatenate([plan.local for rank_plans in per_rank for plan in rank_plans])
    assert np.array_equal(np.sort(seen), np.arange(n))
    for step in range(len(per_rank[0])):
        shares = [rank_plans[step] for rank_plans in per_rank]
        assert all(s.global_count == sum(len(x.local) for x in shares) for s in shares)
        assert all(len(s.local) <= batch // ranks + 1 for s in shares)


@pytest.mark.parametrize("ranks,n,batch", [(2, 100, 10), (4, 1797, 64), (3, 101, 12)])
def test_drop_last_uses_whole_batches_only(ranks, n, batch):
    for scheme in ("global", "block"):
        per_rank = plans(scheme, ranks, n, batch, drop_last=True)
        assert all(len(p) == n // batch for p in per_rank)
        seen = np.concatenate([plan.local for rank_plans in per_rank for plan in rank_plans])
        assert len(seen) == len(np.unique(seen)) == (n // batch) * batch


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_global_order_does_not_depend_on_ranks(ranks):
    single = plans("global", 1, 130, 12, epoch=5)[0]
    split = plans("global", ranks, 130, 12, epoch=5)
    for step, whole in enumerate(single):
        joined = np.concatenate([rank_plans[step].local for rank_plans in split])
        assert np.array_equal(joined, whole.local)


def test_epochs_differ_and_repeat():
    first, second = (Partition(50, 10, 0, 1, seed=1).epoch(e) for e in (0, 1))
    assert not np.array_equal(first[0].local, second[0].local)
    again = Partition(50, 10, 0, 1, seed=1).epoch(0)
    assert all(np.array_equal(a.local, b.local) for a, b in zip(first, again))


def test_block_reads_only_its_block():
    for rank in range(3):
        part = Partition(100, 12, rank, 3, seed=0, scheme="block")
        start, stop = part.owned_range()
        seen = np.concatenate([p.local for p in part.epoch(0)])
        assert seen.min() >= start and seen.max() < stop


def test_contiguous_runs():
    assert contiguous_runs(np.array([2, 3, 4, 7, 9, 10])) == [(2, 5, 0), (7, 8, 3), (9, 11, 4)]
    assert contiguous_runs(np.array([], dtype=np.int64)) == []
