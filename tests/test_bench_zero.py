"""`hpcdl bench zero`: data parallel, ZeRO-1, ZeRO-2 and torch's ZeroRedundancyOptimizer, in one small invocation."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

VARIANTS = ("data", "zero_1", "zero_2", "zero_redundancy")


def test_bench_zero_reports_every_variant_and_the_projection(tmp_path):
    out = tmp_path / "zero.json"
    command = [
        sys.executable, "-m", "hpcdl", "bench", "zero", "--features", "32", "--hidden", "64,32", "--batch", "16",
        "--steps", "3", "--warmup", "1", "--repeats", "1", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    for variant in VARIANTS:
        assert figures[f"{variant}_samples_per_s"] > 0, variant
        assert len(figures[f"{variant}_optimizer_state_bytes"]) == 2, variant
        assert all(peak > 0 for peak in figures[f"{variant}_peak_rss_bytes"]), variant
    assert 0.4 <= figures["optimizer_state_fraction"] <= 0.6
    assert figures["ratio_vs_zero_redundancy"] > 0
    rows = figures["projection"]
    assert [row["ranks"] for row in rows] == [2**k for k in range(3, 11)]
    # Data parallel's share never falls; ZeRO's falls towards params + grads as the ranks grow.
    assert len({row["data_bytes"] for row in rows}) == 1
    for column in ("zero_1_bytes", "zero_2_bytes"):
        assert all(a[column] > b[column] for a, b in zip(rows, rows[1:])), column
        assert rows[0][column] < rows[0]["data_bytes"], column
