"""Scaling studies: the report from a fixed results folder, a real `scale run`, `scale collect`, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl import cli
from hpcdl.scale import report as scale_report

from conftest import REPO

FIXED = REPO / "tests" / "data" / "scale_results"


def _expected_from_json(folder: Path) -> dict[int, dict]:
    """Speedup and efficiency computed here, straight from the run files (the oracle for the report)."""
    runs = [json.loads(p.read_text()) for p in folder.glob("run-r*-rep*.json")]
    rates: dict[int, list[float]] = {}
    for run in runs:
        rates.setdefault(run["ranks"], []).append(run["samples_per_s"])
    base = statistics.median(rates[min(rates)])
    return {
        r: {
            "samples_per_s": statistics.median(v),
            "speedup": statistics.median(v) / base,
            "efficiency": statistics.median(v) / base / (r / min(rates)),
            "oversubscribed": any(x["oversubscribed"] for x in runs if x["ranks"] == r),
        }
        for r, v in rates.items()
    }


def test_report_from_fixed_folder(tmp_path):
    files = scale_report.report([str(FIXED)], str(tmp_path))
    expected = _expected_from_json(FIXED)
    assert expected[2]["speedup"] == pytest.approx(1.75) and expected[4]["efficiency"] == pytest.approx(0.5)
    with files["csv"].open() as f:
        rows = {int(r["ranks"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [1, 2, 4]
    for ranks, want in expected.items():
        got = rows[ranks]
        assert float(got["samples_per_s"]) == pytest.approx(want["samples_per_s"])
        assert float(got["speedup"]) == pytest.approx(want["speedup"])
        assert float(got["efficiency"]) == pytest.approx(want["efficiency"])
        assert (got["oversubscribed"] == "True") == want["oversubscribed"]
    markdown = files["markdown"].read_text()
    assert "| 4 (oversubscribed) |" in markdown and "| 1.75 " in markdown and "| 0.88 " in markdown
    assert "not a speed figure" in markdown

    # Valid PNGs, with the series the report promises.
    import matplotlib.image

    for name in ("speedup", "efficiency", "breakdown"):
        image = matplotlib.image.imread(files[name])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert files[name].stat().st_size < 200_000
    rows_ = scale_report.summarize(*scale_report.load_study(FIXED))
    fig = scale_report.speedup_figure([rows_])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert {"ideal", "fixed-mlp (strong)"} <= set(lines)
    assert list(lines["fixed-mlp (strong)"].get_ydata()) == pytest.approx([1.0, 1.75, 2.0])
    assert any(t.get_text() == "oversubscribed" for t in fig.axes[0].texts)
    fig = scale_report.breakdown_figure([rows_])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == list(scale_report.SPLIT)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4*"]
    heights = [p.get_height() for p in fig.axes[0].patches]  # part by part, one bar per rank count
    assert heights[2 * 3 + 2] == pytest.approx(55.0)  # comm (3rd part) of the 4-rank bar
    assert fig.axes[0].patches[2 * 3 + 2].get_hatch() == "//"  # drawn as oversubscribed


def test_report_rejects_a_folder_without_runs(tmp_path, capsys):
    assert cli.main(["scale", "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no run-r*-rep*.json files" in err and len(err.strip().splitlines()) == 1


def _scale(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", "hpcdl", "scale", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},  # the venv's mpiexec
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hpcdl scale {' '.join(args)} hung: {exc.stdout}\n{exc.stderr}")


def test_small_scale_run_writes_a_complete_folder(datasets, tmp_path):
    out = tmp_path / "study"
    sets = [
        "--set",
        f"data.path='{datasets['synthetic']}'",
        "--set",
        "model.hidden=[32]",
        "--set",
        "train.batch_size=32",
    ]
    done = _scale("run", "--config", "synthetic-mlp", *sets, "--ranks", "1,2", "--steps", "3", "--warmup", "1",
                  "--repeats", "1", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    study = json.loads((out / "study.json").read_text())
    assert study["ranks"] == [1, 2] and study["mode"] == "strong" and study["steps"] == 3
    for ranks in (1, 2):
        run = json.loads((out / f"run-r{ranks}-rep0.json").read_text())
        summary = json.loads((out / "runs" / f"r{ranks}-rep0" / "summary.json").read_text())
        assert run["ranks"] == ranks == len(run["peak_rss_mb"]) and run["steps"] == 3 and run["warmup_steps"] == 1
        assert run["samples_per_s"] == pytest.approx(summary["samples_per_s"]) and run["samples_per_s"] > 0
        assert run["samples_per_s"] == pytest.approx(3 * 32 / (3 * run["step_ms"] / 1000))
        assert set(run["split_ms"]) == set(scale_report.SPLIT) and run["threads_per_rank"] == 1
        assert run["comm_bytes_per_step"] == 4 * run["params"]  # float32 gradients, once per step
        assert run["oversubscribed"] is False and run["nodes"] == 1 and min(run["peak_rss_mb"]) > 50
        # Timed steps exclude warm-up: the loop ran warmup + steps in total.
        lines = (out / "runs" / f"r{ranks}-rep0" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 4
    for name in ("scaling.md", "scaling.csv", "speedup.png", "efficiency.png", "breakdown.png"):
        assert (out / name).stat().st_size > 0
    assert "2 ranks  rep 1/1" in done.stdout

    # A run launched any other way (a Slurm array element) joins the folder with `scale collect`.
    copy = tmp_path / "other"
    shutil.copytree(out / "runs" / "r2-rep0", copy)
    done = _scale("collect", str(copy), "--out", str(out), "--label", "synthetic-mlp")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "run-r2-rep1.json").read_text())["samples_per_s"] > 0
    assert len(scale_report.summarize(*scale_report.load_study(out))) == 2


def test_scale_run_rejects_bad_input_before_launching(datasets, tmp_path, capsys):
    data = f"data.path='{datasets['synthetic']}'"
    for args, message in (
        (["--ranks", "1,x"], "--ranks '1,x'"),
        (["--ranks", "1,2", "--set", "train.batch_size=33"], "train.batch_size = 33 is not divisible by the 2 ranks"),
        (["--ranks", "1", "--set", "model.name=nope"], "model.name"),
        (["--ranks", "2,3", "--mode", "weak", "--set", "train.batch_size=33"], "divisible by the smallest rank count"),
        (["--ranks", "1", "--set", "data.path='/nonexistent.h5'"], "/nonexistent.h5"),
    ):
        out = tmp_path / "bad"
        assert cli.main(["scale", "run", "--config", "synthetic-mlp", "--set", data, *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
