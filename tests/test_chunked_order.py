"""The `chunked` order: every sample once, the same global batches at any rank count, read by whole blocks."""

import inspect
import json

import h5py
import numpy as np
import pytest

import hpcdl
from hpcdl import checkpoint, config
from hpcdl.data import chunked, make
from hpcdl.data.loader import Loader, SplitReader
from hpcdl.data.partition import Partition

from conftest import assert_one_line, hpcdl_train, read_summary, run_mpi
from reference import assert_close_states

# (n, ranks, batch, block_rows, window_blocks): uneven sizes, short last blocks and windows, batches over windows.
CASES = [(100, 1, 10, 7, 3), (101, 2, 12, 8, 2), (1000, 3, 64, 37, 4), (65, 4, 64, 5, 16), (23, 3, 5, 4, 1)]
CASES += [(500, 2, 300, 16, 2), (37, 4, 6, 1, 5)]


def plans(n, ranks, batch, block_rows, window_blocks, epoch=0, drop_last=False):
    """Every rank's plan of `epoch`, each rank's Partition built on its own (as each MPI rank does)."""
    return [
        Partition(n, batch, rank, ranks, seed=7, scheme="chunked", drop_last=drop_last, block_rows=block_rows,
                  window_blocks=window_blocks).epoch(epoch)
        for rank in range(ranks)
    ]  # fmt: skip


def global_batches(per_rank):
    """The global batch of every step: the ranks' shares joined in rank order."""
    return [np.concatenate([rank_plans[step].local for rank_plans in per_rank]) for step in range(len(per_rank[0]))]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n,ranks,batch,block_rows,window_blocks", CASES)
def test_every_sample_once_per_epoch(n, ranks, batch, block_rows, window_blocks, drop_last):
    per_rank = plans(n, ranks, batch, block_rows, window_blocks, epoch=3, drop_last=drop_last)
    steps = n // batch if drop_last else -(-n // batch)
    assert {len(p) for p in per_rank} == {steps}, "every rank must run the same number of steps"
    seen = np.concatenate(global_batches(per_rank))
    if drop_last:
        assert len(seen) == len(np.unique(seen)) == steps * batch
    else:
        assert np.array_equal(np.sort(seen), np.arange(n))
    for step in range(steps):
        shares = [rank_plans[step] for rank_plans in per_rank]
        assert all(s.global_count == sum(len(x.local) for x in shares) for s in shares)


@pytest.mark.parametrize("n,ranks,batch,block_rows,window_blocks", CASES)
def test_same_global_batches_at_1_2_3_and_4_ranks(n, ranks, batch, block_rows, window_blocks):
    single = global_batches(plans(n, 1, batch, block_rows, window_blocks, epoch=2))
    for size in (2, 3, 4):
        split = global_batches(plans(n, size, batch, block_rows, window_blocks, epoch=2))
        assert all(np.array_equal(a, b) for a, b in zip(single, split, strict=True)), f"{size} ranks"


def test_the_order_is_shuffled_blocks_then_rows_within_windows():
    rng = np.random.default_rng(0)
    order = chunked.chunked_order(1000, 10, 4, rng)
    assert np.array_equal(np.sort(order), np.arange(1000))
    for start in range(0, 1000, 40):  # each window: 4 whole blocks, rows mixed
        blocks = np.unique(order[start : start + 40] // 10)
        assert len(blocks) == 4 and not np.array_equal(order[start : start + 40], np.sort(order[start : start + 40]))
    assert not np.array_equal(np.sort(np.unique(order[:40] // 10)), np.arange(4)), "blocks are shuffled"


def test_epochs_differ_resume_continues_and_the_batch_size_only_cuts():
    first, second = (Partition(300, 20, 0, 1, seed=1, scheme="chunked", block_rows=8).epoch(e) for e in (0, 1))
    assert not np.array_equal(first[0].local, second[0].local)
    again = Partition(300, 20, 0, 1, seed=1, scheme="chunked", block_rows=8).epoch(0)
    assert all(np.array_equal(a.local, b.local) for a, b in zip(first, again))
    # Resuming at step 6 in a new process: a new planner gives steps 6.. as they were (the loader test reads them).
    resumed = Partition(300, 20, 0, 1, seed=1, scheme="chunked", block_rows=8).epoch(0)[6:]
    assert all(np.array_equal(a.local, b.local) for a, b in zip(first[6:], resumed, strict=True))
    # A batch size that divides the samples done starts at the same sample: the order does not depend on it.
    done = np.concatenate([p.local for p in first[:6]])
    halves = Partition(300, 10, 0, 1, seed=1, scheme="chunked", block_rows=8).epoch(0)
    assert np.array_equal(np.sort(done), np.sort(np.concatenate([p.local for p in halves[:12]])))


def test_a_rank_reads_about_its_share_of_each_window():
    """The sorted global batch puts each rank's rows in a band of its window's blocks."""
    n, ranks, block_rows, window_blocks = 20000, 4, 50, 16
    touched = 0
    for rank in range(ranks):
        part = Partition(n, 256, rank, ranks, seed=0, scheme="chunked", block_rows=block_rows,
                         window_blocks=window_blocks)  # fmt: skip
        touched += len(np.unique(np.concatenate([plan.local for plan in part.epoch(0)]) // block_rows))
    # Unsorted, every rank would read every block (4x); sorted, only blocks at the bands' edges are read twice.
    assert touched < 1.6 * (n // block_rows), touched


def test_randomness_lies_between_block_order_and_uniform():
    order = chunked.chunked_order(60000, 334, 16, np.random.default_rng(1))
    figures = chunked.gap_summary(order, 334)
    assert figures["neighbour_gap"] < figures["neighbour_gap_uniform"] / 5  # file neighbours stay within a window
    assert figures["same_block"] > 5 * figures["same_block_uniform"]
    uniform = chunked.gap_summary(np.random.default_rng(1).permutation(60000), 334)
    assert uniform["neighbour_gap"] == pytest.approx(uniform["neighbour_gap_uniform"], rel=0.05)


def test_default_block_is_whole_chunks_of_a_mebibyte(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train/x", shape=(10000, 100), dtype="float32", chunks=(300, 100))  # 120 kB chunks
        f.create_dataset("val/x", shape=(100, 100), dtype="float32")  # contiguous: rows of 400 bytes
    assert chunked.block_rows_of(path, "train", 0) == 9 * 300  # 8.7 chunks make 1 MiB
    assert chunked.block_rows_of(path, "val", 0) == 2621  # 1 MiB / 400 B
    assert chunked.block_rows_of(path, "train", 55) == 55
    defaults = inspect.signature(hpcdl.data.open).parameters
    assert config.DataConfig().window_blocks == defaults["window_blocks"].default == chunked.WINDOW_BLOCKS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chunked")
    plain, packed = folder / "plain.h5", folder / "packed.h5"
    make.make_synthetic(plain, n=1000, features=12, classes=3, progress=False, chunk_rows=37)
    make.make_synthetic(packed, n=1000, features=12, classes=3, progress=False, chunk_rows=37, compression="gzip")
    with h5py.File(plain) as f:
        truth = f["train/x"][:], f["train/y"][:]
    return {"plain": plain, "packed": packed, "truth": truth}


@pytest.mark.parametrize("ranks", [1, 3])
def test_streamed_block_reads_give_the_planned_rows(files, ranks, monkeypatch):
    """Direct and h5py block reads, with and without prefetch, from step 0 and resumed: the planned rows,
    each block read once per epoch as one slice."""
    x_all, y_all = files["truth"]
    reads: list[tuple[int, int]] = []
    original = SplitReader._read_into

    def counted(self, start, stop, x, y):
        reads.append((start, stop))
        original(self, start, stop, x, y)

    monkeypatch.setattr(SplitReader, "_read_into", counted)
    for rank in range(ranks):
        part = Partition(len(y_all), 64, rank, ranks, seed=5, scheme="chunked", block_rows=40, window_blocks=3)
        plans = part.epoch(1)
        for kind in ("plain", "packed"):
            reader = SplitReader(str(files[kind]), "train", part.owned_range(), 0, blocks=part.read_blocks())
            assert reader.blocks is not None and (reader.direct is not None) == (kind == "plain")
            for depth, start in ((0, 0), (2, 0), (2, 5)):
                reads.clear()
                got = list(Loader(reader, part, depth).epoch(1, start))
                assert len(got) == len(plans) - start
                for batch, plan in zip(got, plans[start:]):
                    assert np.array_equal(batch.x.numpy(), x_all[plan.local]), (kind, depth, start)
                    assert np.array_equal(batch.y.numpy(), y_all[plan.local])
                if start == 0:  # a fresh reader's blocks are all new; a reused one's may be held still
                    assert len(reads) == len(set(reads)) and all(b - a <= 40 and a % 40 == 0 for a, b in reads)
            reader.close()


def test_training_at_two_ranks_stopped_and_resumed_mid_epoch_equals_one(datasets, tmp_path):
    """data.partition = 'chunked', streamed by whole blocks: 2 ranks, stopped at step 7 of 12 and resumed to 14,
    train the model one process trains in 14 steps."""
    sets = [
        f"data.path='{datasets['synthetic']}'", "data.partition='chunked'", "data.block_rows=16",
        "data.window_blocks=4", "data.cache_mb=0", "data.prefetch=1", "model.hidden=[16]", "train.batch_size=48",
        "train.optimizer='sgd'", "train.lr=0.05", "train.epochs=100", "run.progress=false",
    ]  # fmt: skip
    for ranks, stops in ((1, [14]), (2, [7, 14])):
        run_dir = tmp_path / f"r{ranks}"
        for stop in stops:
            resume = ("--resume", "auto") if stop != stops[0] else ()
            result = hpcdl_train(ranks, "digits-mlp", *sets, f"run.dir='{run_dir}'", f"train.max_steps={stop}",
                                 extra=resume, timeout=120)  # fmt: skip
            assert result.returncode == 0, result.stderr
        digests = read_summary(run_dir)["param_digests"]
        assert len(digests) == ranks and len(set(digests)) == 1, "ranks' parameters differ"
    one, two = (checkpoint.load(checkpoint.resolve("latest", tmp_path / f"r{r}")) for r in (1, 2))
    assert one["global_step"] == two["global_step"] == 14
    assert_close_states(two["model"], one["model"])


def test_a_bad_window_is_one_line(tmp_path):
    result = hpcdl_train(1, "digits-mlp", "data.window_blocks=0", f"run.dir='{tmp_path / 'run'}'", timeout=60)
    assert_one_line(result, "config: data.window_blocks must be a positive integer, got 0")


def test_bench_io_reports_chunked_beside_block(datasets, tmp_path):
    out = tmp_path / "io.json"
    args = ["-m", "hpcdl", "bench", "io", "--file", str(datasets["synthetic"]), "--ranks", "1", "--batch", "32"]
    result = run_mpi(1, *args, "--train-steps", "0", "--dir", str(tmp_path), "--json", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert {"block_vs_raw", "global_vs_block", "chunked_vs_block", "chunked_neighbour_gap"} <= figures.keys()
    for mode in ("streamed", "warm", "cached"):
        assert figures[f"r1_file_chunked_{mode}_every_sample_once"], mode
    assert "chunked streamed" in result.stdout and "chunked vs block, streamed" in result.stdout
