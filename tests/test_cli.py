"""The command line as a user meets it: --version, fast --help with defaults, `hpcdl plot` and its bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hpcdl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMANDS = [
    (),
    ("train",),
    ("data", "make"),
    ("data", "convert"),
    ("data", "info"),
    ("checkpoint", "info"),
    ("plot",),
    ("infer",),
    ("evaluate",),
    ("export",),
    *(("bench", kind) for kind in ("dp", "allreduce", "comm", "io", "pipeline", "infer")),
    *(("scale", action) for action in ("run", "collect", "report", "project")),
    ("slurm", "submit"),
    ("slurm", "status"),
]


def hpcdl_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m hpcdl args...` in one process."""
    command = [sys.executable, "-m", "hpcdl", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_version():
    result = hpcdl_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hpcdl {hpcdl.__version__}\n" == "hpcdl 0.1.0\n"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "hpcdl")
def test_help_prints_usage(command):
    # Its speed (0.15 s here) comes from a parser that imports nothing heavy: the test below holds that.
    result = hpcdl_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hpcdl"), result.stdout


def test_parser_imports_nothing_heavy():
    # numpy is not in the list: hpcdl/scale/project.py (its options are part of the parser) imports it.
    code = (
        "import sys; from hpcdl.cli import build_parser; build_parser(); "
        "print(' '.join(m for m in ('torch', 'h5py', 'mpi4py', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"building the parser imported {result.stdout.strip()}"


@pytest.mark.parametrize("command", [("train",), ("bench", "dp")])
def test_help_shows_defaults(command):
    shown = hpcdl_cli(*command, "--help").stdout
    assert "(default: " in shown
    assert "(default: None)" not in shown


def assert_png(path: Path) -> None:
    """A real PNG file: the signature, and more than the signature."""
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert len(content) > len(PNG_SIGNATURE), f"{path} is empty"


@pytest.fixture(scope="module")
def trained_run(datasets, tmp_path_factory) -> Path:
    """The run folder of a two-epoch digits training run, one process."""
    run_dir = tmp_path_factory.mktemp("plot") / "run"
    sets = [f"data.path='{datasets['digits']}'", f"run.dir='{run_dir}'", "train.epochs=2", "run.progress=false"]
    result = hpcdl_cli(
        "train", "--config", "digits-mlp", "--threads", "1", *(a for s in sets for a in ("--set", s)), timeout=180
    )
    assert result.returncode == 0, result.stderr
    return run_dir


def test_plot_training_run(trained_run, tmp_path):
    result = hpcdl_cli("plot", trained_run, "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    written = {Path(line).name for line in result.stdout.splitlines()}
    assert {"loss.png", "metrics.png"} <= written
    for name in written:
        assert_png(tmp_path / "plots" / name)


def test_plot_defaults_to_the_run_folder(trained_run):
    result = hpcdl_cli("plot", trained_run)
    assert result.returncode == 0, result.stderr
    assert_png(trained_run / "loss.png")


def write_metrics(folder: Path, *lines: str) -> Path:
    """A run folder whose metrics.jsonl holds these lines."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def test_plot_step_records_give_lr(tmp_path):
    steps = [
        json.dumps({"event": "step", "step": s, "epoch": s / 20, "loss": 2 / s, "lr": 0.01 * s, "grad_norm": None})
        for s in range(1, 41)
    ]
    run_dir = write_metrics(tmp_path / "run", *steps, json.dumps({"event": "complete", "step": 40}))
    result = hpcdl_cli("plot", run_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(run_dir / "loss.png"), str(run_dir / "lr.png")]
    assert_png(run_dir / "lr.png")
    assert not (run_dir / "metrics.png").exists(), "no epoch metrics: no metrics.png"


EPOCH = json.dumps({"event": "epoch", "epoch": 1.0, "step": 24, "loss": 0.5, "acc": 0.9, "val_loss": 0.6})
BAD_PLOTS = {
    "run folder missing": (lambda tmp: [tmp / "nope"], "no such folder"),
    "no metrics.jsonl": (lambda tmp: [tmp], "no metrics.jsonl"),
    "a line not JSON": (lambda tmp: [write_metrics(tmp / "run", EPOCH, '{"event": "epoch", "loss"')], "line 2"),
    "no records to plot": (
        lambda tmp: [write_metrics(tmp / "run", json.dumps({"event": "complete", "step": 0}))],
        "no epoch or step records",
    ),
    "out not writable": (
        lambda tmp: [write_metrics(tmp / "run", EPOCH), "--out", tmp / "run" / "metrics.jsonl" / "plots"],
        "metrics.jsonl is not a folder",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PLOTS))
def test_plot_bad_input(tmp_path, case):
    arguments, words = BAD_PLOTS[case]
    result = hpcdl_cli("plot", *arguments(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcdl: error:") and words in lines[0], result.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_plot_replaces_a_png_only_with_overwrite(tmp_path):
    run_dir = write_metrics(tmp_path / "run", EPOCH)
    (run_dir / "loss.png").write_bytes(b"an earlier plot")
    result = hpcdl_cli("plot", run_dir)
    assert result.returncode == 2 and "loss.png already exists; pass --overwrite" in result.stderr, result.stderr
    assert (run_dir / "loss.png").read_bytes() == b"an earlier plot" and not (run_dir / "metrics.png").exists()
    assert hpcdl_cli("plot", run_dir, "--overwrite").returncode == 0
    assert_png(run_dir / "loss.png")
