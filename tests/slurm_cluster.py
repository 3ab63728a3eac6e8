"""Start, use and stop the Slurm clusters of slurm/ from tests: one node (slurm/local) or N nodes in network
namespaces (slurm/cluster). The module-level functions act on the one-node cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hpcdl.slurm import parse_fields

REPO = Path(__file__).resolve().parents[1]
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


@dataclass
class Cluster:
    """One of the clusters: its up/down scripts, state folder, the daemons' pid files and up.sh's environment."""

    scripts: Path
    state_variable: str
    default_state: Path
    daemons: tuple[str, ...]
    up_env: dict[str, str] = field(default_factory=dict)
    probe: tuple[str, ...] = ()  # a command that must succeed for the cluster to be possible here
    _env: dict[str, str] | None = None
    _unavailable: tuple[str | None] | None = None

    def state_dir(self) -> Path:
        """The folder holding slurm.conf, logs, pid files and saved state."""
        return Path(os.environ.get(self.state_variable, self.default_state))

    def unavailable_reason(self) -> str | None:
        """Why Slurm cannot be installed here (not root, apt fails), else None."""
        if self._unavailable is None:
            self._unavailable = (self._install_failure(),)
        return self._unavailable[0]

    def _install_failure(self) -> str | None:
        if os.geteuid() != 0:
            return f"{self.scripts.name} Slurm cluster needs root (slurmd and munged run as root)"
        if self.probe:
            probed = _run(list(self.probe), 30)
            if probed.returncode != 0:
                probe = " ".join(self.probe)
                return f"`{probe}` failed here, so {self.scripts.name} cannot start: {probed.stdout.strip()}"
        if not shutil.which("slurmctld") and not shutil.which("apt-get"):
            return "Slurm is not installed and there is no apt-get to install it"
        result = _run([str(self.scripts / "up.sh"), "--install-only"], INSTALL_TIMEOUT_S, self.up_env)
        if result.returncode != 0:
            return f"installing slurm-wlm and munge failed:\n{_tail(result.stdout, 20)}"
        return None

    def is_up(self) -> bool:
        """True if up.sh's slurmctld and every slurmd are running."""
        return all(_alive(self.state_dir() / f"{name}.pid", name.split("-")[0]) for name in self.daemons)

    def ensure(self) -> dict[str, str]:
        """Start the cluster (once per process) and return the environment clients need."""
        if self._env is None:
            result = _run([str(self.scripts / "up.sh")], UP_TIMEOUT_S, self.up_env)
            if result.returncode != 0:
                raise RuntimeError(f"{self.scripts / 'up.sh'} failed:\n{_tail(result.stdout, 60)}")
            self._env = {"SLURM_CONF": str(self.state_dir() / "slurm.conf")}
        return dict(self._env)

    def stop(self) -> None:
        """Stop the cluster (down.sh); the next ensure starts it again."""
        result = _run([str(self.scripts / "down.sh")], 120)
        self._env = None
        if result.returncode != 0:
            raise RuntimeError(f"{self.scripts / 'down.sh'} failed:\n{_tail(result.stdout, 40)}")

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment with the cluster's SLURM_CONF (and `extra`)."""
        return {**os.environ, **self.ensure(), **(extra or {})}

    def submit(self, script_path: str | os.PathLike, *sbatch_args: str, env: dict[str, str] | None = None) -> int:
        """Submit a batch script with sbatch and return its job id."""
        args = ["sbatch", "--parsable", *sbatch_args, str(script_path)]
        result = subprocess.run(args, env=self.client_env(env), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
        # --parsable prints "<id>" or "<id>;<cluster>".
        return int(result.stdout.strip().split(";")[0])

    def start_now(self, job_id: int) -> None:
        """Let a pending job start at once; Slurm holds a requeued job for about 120 s."""
        # A requeued job started within the second its last run was cleaned up is refused
        # ("Job credential revoked") and ends FAILED: wait until it is pending, then a moment.
        deadline = time.monotonic() + 60
        while (self.job_info(job_id) or {}).get("JobState") != "PENDING" and time.monotonic() < deadline:
            time.sleep(0.25)
        time.sleep(2)
        subprocess.run(
            ["scontrol", "update", f"jobid={job_id}", "StartTime=now"],
            env=self.client_env(),
            check=True,
            capture_output=True,
            timeout=30,
        )

    def job_info(self, job_id: int) -> dict[str, str] | None:
        """The job's fields from scontrol, else from the jobcomp log, else None."""
        result = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode == 0 and result.stdout.strip():
            return parse_fields(result.stdout.strip())
        # Forgotten by the controller (MinJobAge passed, state wiped): the
        # jobcomp log has the end state and exit code.
        comp_log = self.state_dir() / "jobcomp.txt"
        if comp_log.exists():
            for line in reversed(comp_log.read_text().splitlines()):
                if line.startswith(f"JobId={job_id} "):
                    return parse_fields(line)
        return None

    def wait_job(self, job_id: int, timeout_s: float) -> dict[str, str]:
        """Poll until the job ends; return its fields (JobState, ExitCode, StdOut, Restarts...)."""
        return self.wait_until(job_id, lambda info: info.get("JobState") in TERMINAL_STATES, timeout_s, "its end")

    def wait_until(
        self, job_id: int, done: Callable[[dict[str, str]], bool], timeout_s: float, what: str
    ) -> dict[str, str]:
        """Poll the job's fields until `done(fields)`; after `timeout_s` cancel it and fail with its log's tail."""
        deadline = time.monotonic() + timeout_s
        info = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info is not None and done(info):
                return info
            time.sleep(0.25)
        # Do not leave it running into the next test.
        subprocess.run(["scancel", str(job_id)], env=self.client_env(), capture_output=True, timeout=30)
        state = info.get("JobState") if info else "unknown"
        raise TimeoutError(
            f"Slurm job {job_id}: {what} not seen after {timeout_s:.0f}s (state {state})\n{output_tail(info)}"
        )


LOCAL = Cluster(REPO / "slurm" / "local", "HPCDL_SLURM_DIR", REPO / ".slurm", ("slurmctld", "slurmd"))
# Unthrottled links (LINK=""): a study left a throttle in place? The tests take it off.
MULTINODE = Cluster(
    REPO / "slurm" / "cluster",
    "HPCDL_CLUSTER_DIR",
    REPO / ".cluster",
    ("slurmctld", "slurmd-node1", "slurmd-node2", "munged"),
    {"NODES": "2", "LINK": ""},
    ("unshare", "--net", "--uts", "--mount", "true"),  # the namespaces each node is made of
)

state_dir = LOCAL.state_dir
cluster_unavailable_reason = LOCAL.unavailable_reason
is_up = LOCAL.is_up
ensure_cluster = LOCAL.ensure
stop_cluster = LOCAL.stop
submit = LOCAL.submit
start_now = LOCAL.start_now
job_info = LOCAL.job_info
wait_job = LOCAL.wait_job
wait_until = LOCAL.wait_until


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


def _run(args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **(env or {})},
        )
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
