"""Start, use and stop the one-node Slurm cluster of slurm/local/ from tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpcdl.slurm import parse_fields

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "slurm" / "local" / "up.sh"
DOWN = REPO / "slurm" / "local" / "down.sh"
# States after which a job will not run again (a requeued job passes through
# REQUEUED/PENDING instead, so it is not finished).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
# Enough for apt-get on a slow mirror; starting the daemons takes seconds.
INSTALL_TIMEOUT_S = 900
UP_TIMEOUT_S = 180

_env: dict[str, str] | None = None
_unavailable: tuple[str | None] | None = None


def state_dir() -> Path:
    """The folder holding slurm.conf, logs, pid files and saved state."""
    return Path(os.environ.get("HPCDL_SLURM_DIR", REPO / ".slurm"))


def cluster_unavailable_reason() -> str | None:
    """Why Slurm cannot be installed here (not root, apt fails), else None."""
    global _unavailable
    if _unavailable is None:
        _unavailable = (_install_failure(),)
    return _unavailable[0]


def _install_failure() -> str | None:
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd and munged run as root)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    result = _run([str(UP), "--install-only"], INSTALL_TIMEOUT_S)
    if result.returncode != 0:
        return f"installing slurm-wlm and munge failed:\n{_tail(result.stdout, 20)}"
    return None


def is_up() -> bool:
    """True if up.sh's slurmctld and slurmd are running."""
    return all(_alive(state_dir() / f"{name}.pid", name) for name in ("slurmctld", "slurmd"))


def ensure_cluster() -> dict[str, str]:
    """Start the cluster (once per process) and return the environment clients need."""
    global _env
    if _env is None:
        result = _run([str(UP)], UP_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"slurm/local/up.sh failed:\n{_tail(result.stdout, 60)}")
        _env = {"SLURM_CONF": str(state_dir() / "slurm.conf")}
    return dict(_env)


def stop_cluster() -> None:
    """Stop the cluster's daemons (down.sh); the next ensure_cluster starts it again."""
    global _env
    result = _run([str(DOWN)], 120)
    _env = None
    if result.returncode != 0:
        raise RuntimeError(f"slurm/local/down.sh failed:\n{_tail(result.stdout, 40)}")


def submit(script_path: str | os.PathLike, *sbatch_args: str, env: dict[str, str] | None = None) -> int:
    """Submit a batch script with sbatch and return its job id."""
    args = ["sbatch", "--parsable", *sbatch_args, str(script_path)]
    result = subprocess.run(args, env=_client_env(env), capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    # --parsable prints "<id>" or "<id>;<cluster>".
    return int(result.stdout.strip().split(";")[0])


def start_now(job_id: int) -> None:
    """Let a pending job start at once; Slurm holds a requeued job for about 120 s."""
    # A requeued job started within the second its last run was cleaned up is refused
    # ("Job credential revoked") and ends FAILED: wait until it is pending, then a moment.
    deadline = time.monotonic() + 60
    while (job_info(job_id) or {}).get("JobState") != "PENDING" and time.monotonic() < deadline:
        time.sleep(0.25)
    time.sleep(2)
    subprocess.run(
        ["scontrol", "update", f"jobid={job_id}", "StartTime=now"],
        env=_client_env(),
        check=True,
        capture_output=True,
        timeout=30,
    )


def job_info(job_id: int) -> dict[str, str] | None:
    """The job's fields from scontrol, else from the jobcomp log, else None."""
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)],
        env=_client_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode == 0 and result.stdout.strip():
        return parse_fields(result.stdout.strip())
    # Forgotten by the controller (MinJobAge passed, state wiped): the
    # jobcomp log has the end state and exit code.
    comp_log = state_dir() / "jobcomp.txt"
    if comp_log.exists():
        for line in reversed(comp_log.read_text().splitlines()):
            if line.startswith(f"JobId={job_id} "):
                return parse_fields(line)
    return None


def wait_job(job_id: int, timeout_s: float) -> dict[str, str]:
    """Poll until the job ends; return its fields (JobState, ExitCode, StdOut, Restarts...)."""
    deadline = time.monotonic() + timeout_s
    info = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info is not None and info.get("JobState") in TERMINAL_STATES:
            return info
        time.sleep(0.25)
    # Do not leave it running into the next test.
    subprocess.run(["scancel", str(job_id)], env=_client_env(), capture_output=True, timeout=30)
    state = info.get("JobState") if info else "unknown"
    raise TimeoutError(
        f"Slurm job {job_id} not finished after {timeout_s:.0f}s (state {state})\n"
        f"--- output tail ---\n{output_tail(info)}"
    )


def wait_until(job_id: int, done: Callable[[dict[str, str]], bool], timeout_s: float, what: str) -> dict[str, str]:
    """Poll the job's fields until `done(fields)`; fail with its log's tail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    info = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info is not None and done(info):
            return info
        time.sleep(0.25)
    state = info.get("JobState") if info else "unknown"
    raise TimeoutError(
        f"Slurm job {job_id}: {what} not seen after {timeout_s:.0f}s (state {state})\n{output_tail(info)}"
    )


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """The cluster's client environment (skips where Slurm cannot be installed); stopped if this session started it."""
    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    was_up = is_up()
    env = ensure_cluster()
    yield env
    if not was_up:
        stop_cluster()


def output_tail(info: dict[str, str] | None, lines: int = 30) -> str:
    """The last lines of a job's stdout file, or a note why there are none."""
    path = Path(info["StdOut"]) if info and info.get("StdOut") else None
    if path is None or not path.exists():
        return f"(no output file: {path})"
    return _tail(path.read_text(errors="replace"), lines)


def _client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **ensure_cluster(), **(extra or {})}


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else error.stdout
        return subprocess.CompletedProcess(args, 124, f"{out or ''}\n(timed out after {timeout_s}s)")


def _alive(pid_file: Path, name: str) -> bool:
    try:
        return Path(f"/proc/{pid_file.read_text().strip()}/comm").read_text().strip() == name
    except (OSError, ValueError):
        return False


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])
