"""`hpcdl bench compress` at its smallest sizes: every row of the table made and scored, the report's shape."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, assert_one_line

ROWS = [
    "dense (teacher)", "unstructured 50%", "unstructured 80%", "unstructured 90%", "structured 50% one-shot",
    "structured 50% + 1 epochs", "student alone", "student distilled online", "student distilled precomputed",
]  # fmt: skip


def test_bench_compress_reports_every_model(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "hpcdl", "bench", "compress", "--teacher-hidden", "16", "--epochs", "1",
               "--finetune-epochs", "1", "--ranks", "1", "--rows", "300", "--repeats", "1",
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    models = [row["model"] for row in figures["rows"]]
    assert models[:-1] == ROWS and models[-1] == f"{figures['best']}, int8"
    for row in figures["rows"]:
        assert row["samples_per_s_1"] > 0 and row["samples_per_s_n"] > 0 and row["rows"] == 300, row["model"]
        assert 0 <= row["val_acc"] <= 1 and row["file_gzip_bytes"] > 0, row["model"]
    by_name = {row["model"]: row for row in figures["rows"]}
    dense, structured = by_name["dense (teacher)"], by_name["structured 50% one-shot"]
    assert structured["params"] < dense["params"] and structured["file_bytes"] < dense["file_bytes"]  # smaller
    assert figures["structured_hidden"] == [8] and figures["student_hidden"] == [8]
    for sparsity in (50, 80, 90):  # unstructured: as many parameters, that share of the weights zero
        row = by_name[f"unstructured {sparsity}%"]
        assert row["params"] == dense["params"] and row["nonzero_params"] < dense["params"] * (1 - sparsity / 100 + 0.1)
    assert by_name["student distilled precomputed"]["train_s"] > figures["job_seconds"]["logits"]
    assert figures["structured_speedup_1"] > 0 and set(figures["aims"]) == {
        "structured faster than dense", "unstructured 80% within 1 point of dense",
        "distilled student above the student alone",
    }  # fmt: skip
    assert "aims: " in done.stdout and "| structured 50% + 1 epochs " in done.stdout


def test_bench_compress_bad_option_is_one_line():
    command = [sys.executable, "-m", "hpcdl", "bench", "compress", "--sparsities", "0.5,1.2"]
    assert_one_line(subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO), "--sparsities 1.2")
