"""`hpcdl train --trace`: one Chrome trace from every rank, clocks lined up, the schedule visible."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from hpcdl.parallel.pipeline.schedule import schedule

from conftest import hpcdl_train, run_mpi

STEPS = 4


def _load(path: Path) -> list[dict]:
    """The complete ('X') events of a trace, after checking the Chrome trace format."""
    events = json.loads(path.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    for e in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) and e["dur"] >= 0
    named = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {e["pid"] for e in complete} <= named  # every rank is labelled in the viewer
    return complete


def _rows(events: list[dict]) -> dict[tuple[int, int], list[dict]]:
    rows: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["ts"]):
        rows[e["pid"], e["tid"]].append(e)
    return rows


def _assert_no_overlap(rows: dict[tuple[int, int], list[dict]]) -> None:
    for (pid, tid), row in rows.items():
        for a, b in zip(row, row[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 0.01, f"rank {pid} row {tid}: {a} overlaps {b}"


def test_data_parallel_trace_has_every_rank_phase_and_bucket(datasets, tmp_path):
    path = tmp_path / "out" / "trace.json"
    sets = [f"data.path='{datasets['synthetic']}'", "model.hidden=[32, 32]", "train.batch_size=32"]
    sets += [f"train.max_steps={STEPS}", f"run.dir='{tmp_path / 'run'}'", "parallel.bucket_mb=0.002"]
    done = hpcdl_train(2, "synthetic-mlp", *sets, extra=("--trace", str(path)))
    assert done.returncode == 0, done.stderr
    assert f"trace: {len(_load(path))} events from 2 ranks" in done.stdout
    rows = _rows(_load(path))
    _assert_no_overlap(rows)
    assert {pid for pid, _ in rows} == {0, 1}
    for rank in (0, 1):
        names = [e["name"] for e in rows[rank, 0]]
        for phase in ("forward", "backward", "comm", "optimizer"):
            assert names.count(phase) >= STEPS, (rank, phase, names)
        # Each step: forward, then backward, then the exposed comm, then the optimizer.
        first = [n for n in names if n in ("forward", "backward", "optimizer")][:3]
        assert first == ["forward", "backward", "optimizer"]
        buckets = [tid for pid, tid in rows if pid == rank and tid > 0]
        assert len(buckets) >= 2  # several buckets, each its own row
        for tid in buckets:
            assert len(rows[rank, tid]) == STEPS and rows[rank, tid][0]["name"].startswith("allreduce bucket")
        # A bucket's Allreduce starts during backward (overlap) and ends by the end of the step's comm.
        backward, comm = rows[rank, 0][names.index("backward")], rows[rank, 0][names.index("comm")]
        started = min(rows[rank, tid][0]["ts"] for tid in buckets)
        assert backward["ts"] <= started <= backward["ts"] + backward["dur"] + 1
        assert max(rows[rank, t][0]["ts"] + rows[rank, t][0]["dur"] for t in buckets) <= comm["ts"] + comm["dur"] + 1


def test_bad_trace_path_ends_every_rank_before_training(datasets, tmp_path):
    run_dir = tmp_path / "run"
    sets = [f"data.path='{datasets['synthetic']}'", "model.hidden=[8]", "train.batch_size=32", f"run.dir='{run_dir}'"]
    done = hpcdl_train(2, "synthetic-mlp", *sets, extra=("--trace", str(tmp_path)))
    assert done.returncode == 2
    assert "is a folder" in done.stderr and "Traceback" not in done.stderr
    assert not run_dir.exists()


def test_clock_offsets_are_corrected(tmp_path):
    path = tmp_path / "skew.json"
    done = run_mpi(2, "tests/scripts/trace_skew.py", str(path))
    assert done.returncode == 0, done.stderr
    rows = _rows(_load(path))
    for i in range(3):
        ts = [next(e["ts"] for e in rows[rank, 0] if e["name"] == f"after barrier {i}") for rank in (0, 1)]
        assert abs(ts[1] - ts[0]) < 20_000, ts  # microseconds; uncorrected they would be 1e9 apart


def test_pipeline_trace_shows_the_schedule(datasets, tmp_path):
    path = tmp_path / "pipe.json"
    micro = 4
    sets = [f"data.path='{datasets['synthetic']}'", "model.hidden=[32, 32, 32]", "train.batch_size=32"]
    sets += [f"train.max_steps={STEPS}", f"run.dir='{tmp_path / 'run'}'", "parallel.mode=pipeline"]
    sets += ["parallel.stages=2", f"parallel.micro_batches={micro}", "parallel.schedule=1f1b"]
    done = hpcdl_train(2, "synthetic-mlp", *sets, extra=("--trace", str(path)))
    assert done.returncode == 0, done.stderr
    rows = _rows(_load(path))
    _assert_no_overlap(rows)
    first_forward = {}
    for stage in (0, 1):
        names = [e["name"] for e in rows[stage, 0]]
        assert "send" in names and "recv" in names
        # The first step's forwards and backwards come in the 1F1B order of this stage.
        compute = [n[0].upper() for n in names[: names.index("optimizer")] if n in ("forward", "backward")]
        assert compute == [kind for kind, _ in schedule("1f1b", stage, 2, micro)], (stage, names)
        first_forward[stage] = next(e for e in rows[stage, 0] if e["name"] == "forward")
    # The bubble: stage 1 cannot start before stage 0 has computed and sent its first micro-batch.
    assert first_forward[1]["ts"] >= first_forward[0]["ts"] + first_forward[0]["dur"]
