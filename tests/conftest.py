"""Shared test harness: run hpcdl under a real mpiexec, always with a timeout; small datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl.studies import mpiexec

REPO = Path(__file__).resolve().parent.parent


def mpi_command(ranks: int, *args: str) -> list[str]:
    """`mpiexec -n ranks python ...` with the launcher the benchmarks use (Open MPI's flags for root included)."""
    return [*mpiexec(), "-n", str(ranks), sys.executable, *args]


def run_mpi(ranks: int, *args: str, timeout: float = 120, cwd: Path | None = None, env: dict | None = None):
    """Run `python args...` on `ranks` ranks under mpiexec; a hang fails the test, never blocks it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        return subprocess.run(
            mpi_command(ranks, *args), capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=full_env
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {ranks} {' '.join(args)} hung for {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def reference_sets(data, run_dir, hidden: list[int], batch: int, steps: int, lr: float) -> list[str]:
    """The --set assignments of a run comparable with tests/reference.py: its model, global batch, steps and SGD."""
    return [
        f"data.path='{data}'", f"run.dir='{run_dir}'", f"model.hidden={hidden}", f"train.batch_size={batch}",
        f"train.max_steps={steps}", "train.optimizer='sgd'", f"train.lr={lr}", "train.epochs=100", "run.progress=false",
    ]  # fmt: skip


def hpcdl_train(ranks: int, config: str, *sets: str, extra: tuple[str, ...] = (), timeout: float = 120):
    """`hpcdl train --config C --set ...` on `ranks` ranks, one thread each (2 cores here)."""
    args = ["-m", "hpcdl", "train", "--config", config, "--threads", "1", *extra]
    for assignment in sets:
        args += ["--set", assignment]
    return run_mpi(ranks, *args, timeout=timeout)


def run_watched(ranks: int, args: list[str], marker: str | tuple[str, ...], on_marker=None, timeout: float = 180):
    """Like run_mpi, also timing the job's end from the first stderr line holding `marker` (or any of several)
    (`on_marker(process)` runs then). Returns (status, stdout, stderr, seconds from marker to exit)."""
    markers = (marker,) if isinstance(marker, str) else marker
    import threading
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        mpi_command(ranks, *args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err: list[str] = []
    seen: list[float] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            err.append(line)
            if any(m in line for m in markers) and not seen:
                seen.append(time.monotonic())
                if on_marker:
                    on_marker(proc)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    hung: list[bool] = []
    timer = threading.Timer(timeout, lambda: (hung.append(True), proc.kill()))  # a hang fails the test
    timer.start()
    out = proc.stdout.read()
    proc.wait()
    ended = time.monotonic()
    timer.cancel()
    reader.join(timeout=10)
    if hung:
        pytest.fail(f"mpiexec -n {ranks} {' '.join(args)} hung for {timeout} s:\n{''.join(err)}")
    return proc.returncode, out, "".join(err), (ended - seen[0]) if seen else None


def assert_one_line(result, words: str) -> None:
    """Exit 2, and stderr is the one line `hpcdl: error: ...` holding `words`."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hpcdl: error: ") and words in lines[0], result.stderr


def read_summary(run_dir: Path) -> dict:
    """The summary.json a run wrote."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Small real files of every kind, built once per test session."""
    from hpcdl.data import make

    folder = tmp_path_factory.mktemp("datasets")
    paths = {name: folder / f"{name}.h5" for name in ("digits", "synthetic", "images", "sequences")}
    make.make_digits(paths["digits"])
    make.make_synthetic(paths["synthetic"], n=600, features=20, classes=4, progress=False)
    make.make_images(paths["images"], n=300, channels=1, height=8, width=8, classes=3, progress=False)
    make.make_sequences(paths["sequences"], n=300, length=6, features=3, classes=3, progress=False)
    return paths
