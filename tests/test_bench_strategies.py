"""`hpcdl bench strategies`: every strategy trained and compared at 3 ranks, in one small invocation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

STRATEGIES = ("data", "ps-sync", "ps-async", "local-sgd H=4", "local-sgd H=16")


def test_bench_strategies_reports_every_strategy(tmp_path):
    out = tmp_path / "strategies.json"
    command = [
        sys.executable, "-m", "hpcdl", "bench", "strategies", "--ranks", "3", "--repeats", "1", "--epochs", "1",
        "--warmup", "2", "--target", "0.5", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    strategies = figures["strategies"]
    assert sorted(strategies) == sorted(STRATEGIES)
    assert all(strategies[name]["samples_per_s"] > 0 for name in STRATEGIES)
    per_sample = {name: strategies[name]["bytes_per_sample"] for name in STRATEGIES}
    # The formulas at 3 ranks: ring 2(N-1) G = 4 G, parameter servers 2 W G = 4 G, local SGD 4 G / H.
    assert per_sample["local-sgd H=16"] < per_sample["local-sgd H=4"] < per_sample["data"]
    assert per_sample["local-sgd H=4"] == pytest.approx(per_sample["data"] / 4, rel=1e-3)
    assert per_sample["ps-sync"] == pytest.approx(per_sample["data"], rel=1e-3)
    for name in STRATEGIES:
        reached = strategies[name]["time_to_target_s"]
        assert reached is None or reached > 0, (name, reached)
    assert Path(figures["plot"]).is_file()
    for projected in figures["projection"].values():
        assert projected["nodes"] == [2**k for k in range(11)]
        assert len(projected["samples_per_s"]) == 11 and projected["samples_per_s"][0] > 0
