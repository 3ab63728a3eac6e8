"""The local one-node Slurm cluster runs jobs and reports how they ended."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import slurm_cluster
from slurm_cluster import slurm_env  # noqa: F401 - the session fixture

pytestmark = pytest.mark.slurm
JOB_TIMEOUT_S = 60


def run_script(tmp_path: Path, body: str, *sbatch_args: str) -> tuple[dict[str, str], str]:
    """Submit `body` as a batch script, wait for it, return (job fields, output)."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{body}\n")
    job_id = slurm_cluster.submit(
        script, f"--output={tmp_path}/slurm-%j.out", f"--chdir={tmp_path}", "--time=2", *sbatch_args
    )
    info = slurm_cluster.wait_job(job_id, JOB_TIMEOUT_S)
    return info, (tmp_path / f"slurm-{job_id}.out").read_text()


def test_job_completes_with_its_tasks(slurm_env, tmp_path):  # noqa: F811 - the imported fixture
    info, output = run_script(tmp_path, "hostname\necho ntasks=$SLURM_NTASKS", "--ntasks=2")
    assert info["JobState"] == "COMPLETED", output
    assert info["ExitCode"] == "0:0"
    assert info["StdOut"] == str(tmp_path / f"slurm-{info['JobId']}.out")
    lines = output.split()
    assert socket.gethostname().split(".")[0] in lines
    assert "ntasks=2" in lines


def test_failing_job_reports_its_exit_code(slurm_env, tmp_path):  # noqa: F811 - the imported fixture
    info, _ = run_script(tmp_path, "echo before\nexit 3")
    assert info["JobState"] == "FAILED"
    assert info["ExitCode"] == "3:0"
