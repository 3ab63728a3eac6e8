"""The loader: prefetch changes timing, never batches; direct, h5py, cached and column reads agree."""

import os
import time

import h5py
import numpy as np
import pytest

from hpcdl.data import loader as loader_module
from hpcdl.data import make
from hpcdl.data.loader import Loader, SplitReader
from hpcdl.data.partition import Partition
from hpcdl.errors import DataError

N, FEATURES = 1000, 12
TRAIN = 900  # 10% of N goes to /val


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loader")
    plain, packed = folder / "plain.h5", folder / "packed.h5"
    make.make_synthetic(plain, n=N, features=FEATURES, classes=3, progress=False, chunk_rows=37)
    make.make_synthetic(packed, n=N, features=FEATURES, classes=3, progress=False, chunk_rows=37, compression="gzip")
    with h5py.File(plain) as f:
        truth = f["train/x"][:], f["train/y"][:]
    return {"plain": plain, "packed": packed, "truth": truth}


def batches(loader, epoch=1, start=0):
    return [(b.x.numpy().copy(), b.y.numpy().copy(), b.global_count) for b in loader.epoch(epoch, start)]


@pytest.fixture(params=["spans", "runs"])
def span_reads(request, monkeypatch):
    """Both streamed paths: dense batches read as one span, or every batch as coalesced runs."""
    if request.param == "runs":
        monkeypatch.setattr(loader_module, "SPAN_BYTES", 0)
    return request.param


@pytest.mark.parametrize("scheme", ["global", "block"])
@pytest.mark.parametrize("ranks", [1, 3])
def test_prefetch_gives_the_same_batches_in_the_same_order(files, scheme, ranks, span_reads):
    x_all, y_all = files["truth"]
    n = len(y_all)
    for rank in range(ranks):
        part = Partition(n, 64, rank, ranks, seed=5, scheme=scheme)
        results = {}
        for kind in ("plain", "packed"):
            for cache in (0, 1e9):
                reader = SplitReader(str(files[kind]), "train", part.owned_range(), cache)
                for depth in (0, 1, 4):
                    results[kind, cache, depth] = batches(Loader(reader, part, depth))
                    results[kind, cache, depth, "resumed"] = batches(Loader(reader, part, depth), start=5)
                reader.close()
        plans = part.epoch(1)
        expected = [(x_all[p.local], y_all[p.local], p.global_count) for p in plans]
        for key, got in results.items():
            want = expected[5:] if "resumed" in key else expected
            assert len(got) == len(want), key
            for (gx, gy, gc), (wx, wy, wc) in zip(got, want):
                assert np.array_equal(gx, wx) and np.array_equal(gy, wy) and gc == wc, key


def test_direct_reads_are_used_only_where_they_apply(files):
    plain = SplitReader(str(files["plain"]), "train", (0, TRAIN), 0)
    packed = SplitReader(str(files["packed"]), "train", (0, TRAIN), 0)
    assert plain.direct is not None and packed.direct is None
    plain.close()
    packed.close()


@pytest.mark.parametrize("columns", [(0, 12), (3, 8), (11, 12), (5, 5)])
def test_column_hyperslabs(files, columns, span_reads):
    x_all, y_all = files["truth"]
    indices = np.random.default_rng(0).permutation(len(y_all))[:100]
    for kind in ("plain", "packed"):
        for cache in (0, 1e9):
            reader = SplitReader(str(files[kind]), "train", (0, len(y_all)), cache, columns)
            x, y = reader.read(indices)
            assert np.array_equal(x, x_all[indices, columns[0] : columns[1]]) and np.array_equal(y, y_all[indices])
            reader.close()


def test_columns_need_flat_samples(tmp_path):
    path = tmp_path / "images.h5"
    make.make_images(path, n=40, height=4, width=4, classes=2, progress=False)
    with pytest.raises(DataError, match="needs flat samples"):
        SplitReader(str(path), "train", (0, 36), 0, (0, 2))


class SlowReader:
    """A real reader that takes `delay` seconds per batch, as a slow file system would."""

    def __init__(self, reader, delay):
        self.reader, self.delay = reader, delay

    def read(self, indices):
        time.sleep(self.delay)
        return self.reader.read(indices)

    def will_need(self, indices):
        self.reader.will_need(indices)


def test_prefetch_hides_reads_slower_than_nothing_but_faster_than_compute(files):
    part = Partition(TRAIN, 100, 0, 1, seed=0)
    reader = SlowReader(SplitReader(str(files["plain"]), "train", (0, TRAIN), 0), delay=0.03)
    waits = {}
    for depth in (0, 2):
        waits[depth] = []
        for batch in Loader(reader, part, depth).epoch(0):
            waits[depth].append(batch.wait_s)
            time.sleep(0.06)  # the step's compute: longer than a read
    # Without prefetch every read is waited for; with it, only the first one.
    assert min(waits[0]) >= 0.025
    assert np.mean(waits[2][1:]) < 0.01, waits[2]


@pytest.mark.parametrize("scheme", ["global", "block", "chunked"])
def test_streamed_reads_ask_the_kernel_for_the_rows_of_the_steps_ahead(files, scheme, monkeypatch):
    hinted = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, size, advice: hinted.append((at, at + size, advice)))
    part = Partition(TRAIN, 64, 1, 2, seed=0, scheme=scheme, block_rows=50, window_blocks=2)
    reader = SplitReader(str(files["plain"]), "train", part.owned_range(), 0, blocks=part.read_blocks())
    list(Loader(reader, part, 0).epoch(0))
    assert {advice for _, _, advice in hinted} == {os.POSIX_FADV_WILLNEED}
    starts, ends = np.array([h[0] for h in hinted]), np.array([h[1] for h in hinted])
    for plan in part.epoch(0)[1:]:  # the first step is read at once; every later one was asked for before
        rows = reader.direct._positions(plan.local)
        assert all(((starts <= r) & (r + reader.direct.row_bytes <= ends)).any() for r in rows.tolist())
    hinted.clear()
    cached = SplitReader(str(files["plain"]), "train", part.owned_range(), 1e9, blocks=part.read_blocks())
    list(Loader(cached, part, 0).epoch(0))
    assert not hinted, "rows in memory need no hints"


def test_a_read_error_in_the_prefetch_thread_reaches_the_step(files, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(files["plain"].read_bytes())
    reader = SplitReader(str(broken), "train", (0, TRAIN), 0)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 2)
    with pytest.raises(DataError, match="broken.h5"):
        for _ in Loader(reader, Partition(TRAIN, 100, 0, 1, seed=0, scheme="block"), 2).epoch(0):
            pass
