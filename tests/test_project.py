"""Alpha-beta projections: the textbook formulas, the fits, the error on measured points, `bench comm`."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl import cli
from hpcdl.bench.comm import fits
from hpcdl.scale import project

from conftest import REPO

FIXED = REPO / "tests" / "data" / "scale_results"


def test_ring_allreduce_formula_on_known_inputs():
    # 2(p-1) a + 2(p-1)/p n b with p=4, n=1 MB, a=10 us, b=1 ns/B: 60 us + 1.5 ms.
    assert project.ring_allreduce_time(4, 1e6, 1e-5, 1e-9) == pytest.approx(6e-5 + 1.5e-3)
    assert project.ring_allreduce_time(1, 1e6, 1e-5, 1e-9) == 0.0
    assert project.ring_allreduce_time(1024, 4e8, 2e-6, 1e-10) == pytest.approx(
        2 * 1023 * 2e-6 + 2 * 1023 / 1024 * 0.04
    )
    work = project.Workload(1e-4, 0.01, 1e6, 256)
    net = project.Network(1e-5, 1e-9)
    assert project.step_time("ring-allreduce DP", 1, work, net) == pytest.approx(256e-4 + 0.01)
    assert project.step_time("ring-allreduce DP", 4, work, net) == pytest.approx(64e-4 + 0.01 + 6e-5 + 1.5e-3)
    assert project.step_time("parameter server", 4, work, net) == pytest.approx(64e-4 + 0.01 + 8 * (1e-5 + 1e-3))
    # Pipeline: 8 micro-batches, 2 stages: 9 slots of (compute / 16 + two sends), optimizer split over stages.
    sends = 2 * (1e-5 + 4096 * 32 * 1e-9)
    assert project.step_time("pipeline", 2, work, net) == pytest.approx(9 * (256e-4 / 2 / 8 + sends) + 0.005)
    strong = project.project(work, net, "strong", [1, 2])
    assert strong["ring-allreduce DP"][0] == pytest.approx(256 / (256e-4 + 0.01))


def test_fits_recover_alpha_and_beta():
    sizes = [4 * 4**k for k in range(10)]
    alpha, beta = 3e-6, 2e-10
    assert project.fit_alpha_beta(sizes, [alpha + n * beta for n in sizes]) == pytest.approx((alpha, beta))
    # bench comm reads an Allreduce fit as the ring's alpha and beta.
    p = 4
    ops = {"allreduce": {"bytes": sizes, "seconds": [project.ring_allreduce_time(p, n, alpha, beta) for n in sizes]}}
    fit = fits(p, ops)["allreduce"]["fit"]
    assert fit["alpha_s"] == pytest.approx(alpha) and fit["beta_s_per_byte"] == pytest.approx(beta)
    assert fit["max_rel_error"] < 1e-9


def _independent_prediction(ranks: int, alpha: float, beta: float) -> float:
    """The ring-DP step time of the fixed study, computed here from the run files (the test's oracle)."""
    runs = [json.loads(p.read_text()) for p in FIXED.glob("run-r*-rep*.json")]
    base = [r for r in runs if r["ranks"] == 1]
    median = lambda key: statistics.median(r["split_ms"][key] for r in base) / 1000  # noqa: E731
    compute_per_sample = median("compute") / 256
    overhead = median("data") + median("optimizer") + median("other")
    n = 814120
    return 1000 * (
        compute_per_sample * 256 / ranks + overhead + 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * n * beta
    )


def test_projection_reports_its_error_on_measured_points(tmp_path, capsys):
    alpha, beta = 5e-6, 1e-9
    args = [
        "scale",
        "project",
        "--study",
        str(FIXED),
        "--alpha",
        str(alpha),
        "--beta",
        str(beta),
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    measured = {1: 256.0, 2: statistics.median([142.2, 150.6]), 4: 128.0}
    for ranks, step in measured.items():
        predicted = _independent_prediction(ranks, alpha, beta)
        error = 100 * (predicted - step) / step
        assert f"measured {ranks} rank(s): {step:.2f} ms/step, predicted {predicted:.2f}, error {error:+.1f}%" in out
    result = json.loads((tmp_path / "projection.json").read_text())
    assert result["nodes"][-1] == 1024 and len(result["strong"]["pipeline"]) == 11
    # Strong scaling of ring DP saturates: never above ideal, and efficiency falls at 1,024 nodes.
    ring = result["strong"]["ring-allreduce DP"]
    assert all(r <= ring[0] * p * 1.0001 for r, p in zip(ring, result["nodes"]))
    assert ring[-1] / (ring[0] * 1024) < 0.5
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "projection.png").shape[0] > 100
    fig = project.projection_figure(result["strong"], result["weak"], result["nodes"], [(1, 1.0), (2, 1.75)])
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert labels == {"ideal", "measured", *project.STRATEGIES}


def test_projection_needs_network_figures(capsys):
    assert cli.main(["scale", "project", "--study", str(FIXED)]) == 2
    assert "--comm" in capsys.readouterr().err


def test_bench_comm_measures_and_feeds_the_projection(tmp_path, capsys):
    comm_json = tmp_path / "comm.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [
        sys.executable,
        "-m",
        "hpcdl",
        "bench",
        "comm",
        "--max-bytes",
        "4096",
        "--max-calls",
        "20",
        "--json",
        str(comm_json),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench comm hung: {exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, done.stderr
    figures = json.loads(comm_json.read_text())
    for op in ("allreduce", "bcast", "allgather", "sendrecv"):
        data = figures["ops"][op]
        assert data["bytes"] == [4, 16, 64, 256, 1024, 4096] and all(t > 0 for t in data["seconds"])
        assert data["fit"]["alpha_s"] >= 0 and data["fit"]["beta_s_per_byte"] >= 0
    assert "alpha (us)" in done.stdout and figures["ranks"] == 2
    assert cli.main(["scale", "project", "--study", str(FIXED), "--comm", str(comm_json), "--out", str(tmp_path)]) == 0
    assert "ring alpha" in capsys.readouterr().out
