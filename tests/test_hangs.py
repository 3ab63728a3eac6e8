"""No hang by default, a launcher that cannot be misused, stop signals, and what a NaN loss names.

Each case measures the seconds from the fault to every rank gone and prints them (`-s`) as
`measured: ...`; the assertion messages carry them too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hpcdl import config
from hpcdl.comm import EXIT_ERROR, EXIT_REQUEUE
from hpcdl.watchdog import AUTO_FACTOR, AUTO_FLOOR_S, StepLimit

from conftest import REPO, mpi_command, run_mpi, run_watched

SCRIPTS = Path(__file__).parent / "scripts"
LAUNCH_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "WORLD_SIZE")


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    """90,000 training rows: at batch 2 one epoch runs far longer than any of these tests."""
    from hpcdl.data import make

    path = tmp_path_factory.mktemp("long") / "long.h5"
    make.make_synthetic(path, n=100_000, features=20, classes=4, progress=False)
    return path


def train_args(data: Path, run_dir: Path, *sets: str) -> list[str]:
    """`hpcdl train` of one long epoch, no checkpoints on the way, no watchdog setting (the default)."""
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1"]
    for assignment in (
        f"data.path='{data}'", f"run.dir='{run_dir}'", "model.hidden=[16]", "train.batch_size=2",
        "train.epochs=1", "run.progress=false", *sets,
    ):  # fmt: skip
        args += ["--set", assignment]
    return args


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables (pytest itself may run under one)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def child_pids(pid: int) -> list[int]:
    """The live children of process `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_state(int(entry.name)) not in ("", "Z"):
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def process_state(pid: int) -> str:
    """The process's state letter (R, S, T, Z, ...); '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def gone(pid: int) -> bool:
    """True once the process has ended (a zombie waiting to be reaped has ended)."""
    return process_state(pid) in ("", "Z")


class Job:
    """A job under mpiexec, its output collected as it comes, its ranks found by their PMI_RANK."""

    def __init__(self, ranks: int, args: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            mpi_command(ranks, *args), cwd=REPO, env=env or clean_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, keep=lines: keep.extend(s), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Until `text` shows in stdout; fails the test after `timeout`."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.out):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                pytest.fail(f"{text!r} not seen:\n{self.output()}")
            time.sleep(0.05)

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the job's ranks (the launcher's proxy's children)."""
        pids = [pid for proxy in child_pids(self.proc.pid) for pid in child_pids(proxy)]
        return {int(environ(pid)["PMI_RANK"]): pid for pid in pids}

    def ended(self, timeout: float) -> int:
        """The launcher's status once it ends; fails the test (after ending the job) if it runs past `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """End the launcher and every rank it started."""
        for pid in [*self.ranks().values(), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)

    def output(self) -> str:
        """Both streams so far, for failure messages."""
        time.sleep(0.2)  # the reader threads catch up with the last lines
        return "".join(self.out) + "\n--- stderr ---\n" + "".join(self.err)


def environ(pid: int) -> dict[str, str]:
    """A process's environment, from /proc."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def measured(what: str, seconds: float, since: str = "the fault") -> str:
    """Print a measurement where `pytest -s` shows it; the same text goes into assertion messages."""
    line = f"measured: {what}: {seconds:.1f} s from {since} to every rank gone"
    print(line)
    return line


def test_auto_limit_allows_a_minute_until_steps_are_measured_then_follows_them():
    # The default: a run that sets nothing is watched. The end-to-end proof of a stopped rank ended by the watchdog
    # is the faults table's "hang on one rank" and test_multinode's SIGSTOP (a limit of 4 s, the same StepLimit); the
    # default's own minute is measured, not waited for in every suite run (README, Reliability).
    assert config.load("digits-mlp", []).run.watchdog_s == "auto"
    limit = StepLimit("auto")
    assert limit.seconds == AUTO_FLOOR_S, "a rank stopped in the first steps ends the job in about a minute"
    assert "before any step is measured; set run.watchdog_s to seconds" in str(limit)
    limit.record(10.0)  # a slow first step (allocation, first reads) loosens the limit at once
    assert limit.seconds == AUTO_FACTOR * 10.0
    for _ in range(20):
        limit.record(0.01)
    assert limit.seconds == AUTO_FLOOR_S and "the median step of 10 ms" in str(limit)


@pytest.mark.parametrize("where", ["init-everywhere", "init-on-rank-0"])
def test_rank_that_never_reaches_setup_ends_the_job(where, datasets, tmp_path):
    script = [str(SCRIPTS / "fit_on_rank0.py"), where, str(datasets["digits"]), str(tmp_path / "run")]
    began = time.monotonic()
    result = run_mpi(2, *script, timeout=60, env={"HPCDL_SETUP_TIMEOUT_S": "5"})
    # The limit (5 s) plus starting Python and torch.
    note = measured(f"fit on rank 0 only ({where}), HPCDL_SETUP_TIMEOUT_S=5", time.monotonic() - began, "the start")
    assert result.returncode == EXIT_ERROR, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpcdl: error")]
    assert len(errors) == 1, result.stderr
    assert "only rank(s) 0 of 2 reached" in errors[0] and "rank(s) 1 did not" in errors[0], errors[0]
    assert "is every rank running the same code?" in errors[0] and "HPCDL_SETUP_TIMEOUT_S" in errors[0]
    expected = "World.agree (called from fit)" if where == "init-everywhere" else "hpcdl's start-up"
    assert expected in errors[0], errors[0]
    assert time.monotonic() - began < 20, note


def test_ranks_end_when_their_launcher_is_gone(long_data, tmp_path):
    job = Job(2, train_args(long_data, tmp_path / "run"))
    job.wait_for("hpcdl: 2 ranks on")
    ranks = job.ranks()
    (proxy,) = child_pids(job.proc.pid)
    os.kill(proxy, signal.SIGKILL)
    killed = time.monotonic()
    while not all(gone(pid) for pid in ranks.values()) and time.monotonic() - killed < 30:
        time.sleep(0.05)
    note = measured("the launcher's proxy killed", time.monotonic() - killed)
    left = [pid for pid in ranks.values() if not gone(pid)]
    if left:
        job.kill()
    job.proc.wait(30)
    assert not left, f"{note}; ranks still training headless: {left}"
    assert time.monotonic() - killed < 10, note


def test_sigint_on_one_rank_checkpoints_and_exits_75(datasets, tmp_path):
    run_dir = tmp_path / "run"
    sets = [f"data.path='{datasets['synthetic']}'", f"run.dir='{run_dir}'", "model.hidden=[16]"]
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1", "--fault", "stall@1:13"]
    for assignment in [*sets, "train.batch_size=32", "train.epochs=2", "run.progress=false"]:
        args += ["--set", assignment]

    def interrupt_rank_0(proc: subprocess.Popen) -> None:
        (proxy,) = child_pids(proc.pid)
        rank_0 = next(pid for pid in child_pids(proxy) if environ(pid)["PMI_RANK"] == "0")
        os.kill(rank_0, signal.SIGINT)  # while rank 1 stalls in step 13

    status, stdout, stderr, seconds = run_watched(2, args, "injecting stall", on_marker=interrupt_rank_0)
    note = measured("SIGINT to rank 0 (rank 1 stalling 3 s in the step)", seconds)
    assert status == EXIT_REQUEUE, f"{note}\n{stdout}\n{stderr}"
    assert f"hpcdl: stopped by SIGINT at step 13; checkpoint {run_dir}/checkpoints/step-00000013.pt;" in stdout
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.parametrize(("when", "status"), [("before", 128 + signal.SIGTERM), ("after", EXIT_REQUEUE)])
def test_second_stop_signal_ends_at_once_with_75_once_the_checkpoint_is_written(when, status):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "double_signal.py"), when], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == status, result.stderr
    assert "second stop signal (SIGTERM): ending at once" in result.stderr
    saved = "hpcdl: stopped by SIGTERM at step 3; checkpoint run/checkpoints/step-00000003.pt"
    assert (saved in result.stdout) == (when == "after"), result.stdout


@pytest.mark.parametrize("variable", ["SLURM_NTASKS", "WORLD_SIZE"])
def test_singletons_of_a_mismatched_launcher_refuse_to_train(variable, datasets, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, *train_args(datasets["digits"], run_dir)]
    began = time.monotonic()
    procs = [
        subprocess.Popen(args, cwd=REPO, env=clean_env(**{variable: "2"}), text=True, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [(proc.wait(60), proc.stderr.read()) for proc in procs]
    note = measured(f"2 singletons with {variable}=2", time.monotonic() - began, "their start")
    for status, stderr in results:
        assert status == EXIT_ERROR, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert f"the launcher started 2 processes ({variable}=2) but MPI sees each as a job of 1 rank" in lines[0]
        assert "srun --mpi=pmi2" in lines[0] and "mpirun -n 2" in lines[0], lines[0]
    assert not run_dir.exists(), "a refused launch must not create the run folder"
    assert time.monotonic() - began < 30, note


def test_a_one_rank_launch_inside_an_allocation_trains(datasets, tmp_path):
    # mpiexec -n 1 sets PMI_SIZE=1 for this launch: the allocation's SLURM_NTASKS=4 is not a singleton's launcher.
    run_dir = tmp_path / "run"
    command = mpi_command(1, *train_args(datasets["digits"], run_dir, "train.max_steps=2"))
    result = subprocess.run(
        command, cwd=REPO, env=clean_env(SLURM_NTASKS="4"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "hpcdl: 1 ranks on" in result.stdout and (run_dir / "model.pt").is_file(), result.stdout


def test_init_exports_the_place_for_libraries():
    result = run_mpi(2, str(SCRIPTS / "launch_env.py"), timeout=60)
    assert result.returncode == 0, result.stderr
    # The launcher may join the ranks' lines: one JSON object each, whatever the line breaks.
    places = sorted((json.loads(text) for text in re.findall(r"\{[^}]*\}", result.stdout)), key=lambda p: p["rank"])
    assert places == [
        {"rank": r, "size": 2, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"}
        for r in (0, 1)
    ]


def test_exception_on_every_rank_prints_one_traceback(datasets, tmp_path):
    args = train_args(datasets["synthetic"], tmp_path / "run", "train.batch_size=32")
    result = run_mpi(2, *args, "--fault", "raise@0:3", "--fault", "raise@1:3", timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert "injected fault: raise on rank 0 at step 3" in result.stderr, result.stderr


def test_nonfinite_loss_names_the_batch_rows_and_suggests_scan(datasets, tmp_path):
    from hpcdl.data.partition import Partition

    data = datasets["synthetic"]
    args = train_args(data, tmp_path / "run", "train.batch_size=32")
    result = run_mpi(2, *args, "--fault", "nan@1:1", timeout=60)
    assert result.returncode == EXIT_ERROR, result.stderr
    # Rank 1's half of the first global batch, as the loader reads it.
    cfg = config.load("digits-mlp")
    plan = Partition(540, 32, 1, 2, cfg.train.seed, cfg.data.partition, drop_last=cfg.data.drop_last).epoch(0)[0]
    rows = ", ".join(str(r) for r in sorted(plan.local)[:8])
    expected = (
        f"non-finite loss at step 1 on rank 1; first non-finite gradient: 1.weight (NaN); "
        f"the batch held rows {rows}, ... (16 in the batch) of /train in {data}; "
        f"check the data with `hpcdl data info {data} --scan`; set run.nan_policy = 'skip'"
    )
    assert expected in result.stderr, result.stderr
