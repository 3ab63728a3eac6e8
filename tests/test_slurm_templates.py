"""The slurm/ templates on a real (local, one-node) Slurm: they run, requeue and resume, and report.

Jobs are submitted through `hpcdl slurm submit`, so the knob filling and the printed sbatch
line are what is tested; the end state comes from scontrol (no sacct without slurmdbd here).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl import checkpoint, cli
from hpcdl.config import ModelConfig
from hpcdl.slurm import TEMPLATES_DIR, template_knobs, template_names

import slurm_cluster
from conftest import hpcdl_train, read_summary
from reference import assert_close_states, reference_train
from slurm_cluster import slurm_env  # noqa: F401 - the session fixture

JOB_TIMEOUT_S = 240
TRAINING = ("train", "train-gpu", "pipeline")
LAUNCH_BLOCK = re.compile(r"# --- launch and requeue.*", re.DOTALL)
# Short runs that tests/reference.py can repeat in one process (SGD; digits-mlp's model).
LR = 0.1
SGD = ("train.optimizer='sgd'", f"train.lr={LR}", "train.epochs=3")
DIGITS_MODEL = ModelConfig(hidden=[128, 64])


@pytest.fixture
def cluster(slurm_env, monkeypatch):  # noqa: F811 - slurm_env is the imported fixture
    """Client environment for in-process `hpcdl slurm`: the cluster's SLURM_CONF, the venv first on PATH."""
    for name, value in slurm_env.items():
        monkeypatch.setenv(name, value)
    # Jobs inherit it (--export=ALL): the templates' python3 is the venv's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return slurm_env


def hpcdl_slurm(capsys, *args: str) -> tuple[int, str, str]:
    """Run `hpcdl slurm ARGS` in this process; (exit status, stdout, stderr)."""
    status = cli.main(["slurm", *args])
    out, err = capsys.readouterr()
    return status, out, err


def submit(capsys, tmp_path: Path, template: str, *args: str) -> int:
    """Submit through `hpcdl slurm submit`, log and working folder in tmp_path; the job id."""
    status, out, err = hpcdl_slurm(
        capsys,
        "submit",
        template,
        "--time=5",
        f"--output={tmp_path}/slurm-%j.out",
        f"--sbatch=--chdir={tmp_path}",
        *args,
    )
    assert status == 0, err
    line, submitted = out.strip().splitlines()
    assert " sbatch --parsable " in line and line.endswith(f"{template}.sbatch")
    return int(submitted.removeprefix("submitted job "))


def finished(job_id: int) -> tuple[dict[str, str], str]:
    """Wait for the job's end; its fields and its log."""
    info = slurm_cluster.wait_job(job_id, JOB_TIMEOUT_S)
    return info, Path(info["StdOut"]).read_text()


def data_args(datasets, *sets: str) -> list[str]:
    """--set options for a short run on the digits file."""
    return [
        f"--set=data.path='{datasets['digits']}'",
        "--set=run.progress=false",
        *(f"--set={assignment}" for assignment in sets),
    ]


def final_model(run_dir: Path) -> dict:
    """The model of a run's newest checkpoint."""
    return checkpoint.load(checkpoint.resolve("latest", run_dir))["model"]


# --- the templates themselves (no cluster needed) --------------------------------------------


def test_templates_share_one_launch_block_and_requeue():
    blocks = {name: LAUNCH_BLOCK.search((TEMPLATES_DIR / f"{name}.sbatch").read_text()) for name in TRAINING}
    assert all(blocks.values()), "a training template lost its launch-and-requeue block"
    assert len({block.group(0) for block in blocks.values()}) == 1, "the launch blocks differ between templates"
    for name in template_names():
        text = (TEMPLATES_DIR / f"{name}.sbatch").read_text()
        subprocess.run(["bash", "-n", TEMPLATES_DIR / f"{name}.sbatch"], check=True, timeout=30)
        assert {"CONFIG", "HPCDL_ARGS", "HPCDL_PYTHON"} <= template_knobs(TEMPLATES_DIR / f"{name}.sbatch").keys()
        if name in (*TRAINING, "sweep"):  # the sweep's block launches `hpcdl sweep`; it requeues the same way
            assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.MULTILINE), name
            assert re.search(r"^#SBATCH --requeue$", text, re.MULTILINE), name


def test_submit_rejects_bad_knobs_before_submitting(capsys, tmp_path):
    cases = {
        ("train", "--nodes=0"): "--nodes must be an integer >= 1, got 0",
        ("train", "--ntasks-per-node=-2"): "--ntasks-per-node must be an integer >= 1",
        ("trian",): "unknown template 'trian' (templates: pipeline, scaling, sweep, train, train-gpu",
        ("train", f"--config={tmp_path}/missing.toml"): f"config: file {tmp_path}/missing.toml does not exist",
        ("train", "--set=train.epochs=0"): "config: train.epochs must be a positive integer",
        ("train", "--knob=STAGES=2"): "template train has no knob STAGES",
        ("train", "--launcher=ssh"): "--launcher must be srun or mpirun",
    }
    for args, message in cases.items():
        status, out, err = hpcdl_slurm(capsys, "submit", *args)
        assert status == 2, args
        # Nothing submitted: the sbatch line is printed only once the knobs are valid.
        assert out == "", args
        assert err.count("\n") == 1 and message in err, (args, err)
    status, out, err = hpcdl_slurm(capsys, "status", "12x")
    assert (status, out, err) == (2, "", "hpcdl: error: slurm: '12x' is not a job id (e.g. 1234 or 1234_5)\n")


# --- jobs on the local cluster ----------------------------------------------------------------


@pytest.mark.slurm
def test_train_templates_run_with_both_launchers(cluster, capsys, monkeypatch, datasets, tmp_path):
    args = data_args(datasets, *SGD)
    gpu = ("train-gpu", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1")
    jobs = {
        "srun": submit(capsys, tmp_path, "train", "--ntasks-per-node=2", "--run-dir=srun", *args),
        "mpirun": submit(capsys, tmp_path, "train", "--launcher=mpirun", "--run-dir=mpirun", *args),
    }
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs["cpu"] = submit(capsys, tmp_path, *gpu, "--launcher=mpirun", "--run-dir=cpu", *args)
    # Each rank takes its node-local GPU out of the job's list (set here as Slurm sets it for 2 GPUs) and insists on
    # training on it: on this GPU-less node every rank ends with the one line, never a silent CPU run.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    jobs["gpu"] = submit(capsys, tmp_path, *gpu, "--run-dir=gpu", *args)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    # The GPU template is a valid request as written, less what this 8-CPU node lacks (GPUs, 16 CPUs).
    test_only = subprocess.run(
        ["sbatch", "--test-only", "--gpus-per-node=0", "--cpus-per-task=2", TEMPLATES_DIR / "train-gpu.sbatch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr
    # What only the cluster can refuse fails at sbatch, with its reason.
    status, _, err = hpcdl_slurm(capsys, "submit", "train", "--partition=no-such-partition")
    assert status == 2 and "sbatch failed: sbatch: error: invalid partition" in err.lower(), err

    results = {name: finished(job) for name, job in jobs.items()}
    gpu_info, gpu_log = results.pop("gpu")
    assert (gpu_info["JobState"], gpu_info["ExitCode"]) == ("FAILED", "2:0"), gpu_log
    assert "local rank 0 -> GPU 3" in gpu_log and "local rank 1 -> GPU 5" in gpu_log
    assert 'hpcdl: error: train.device = "cuda", but no GPU was found' in gpu_log and not (tmp_path / "gpu").exists()
    for name, (info, log) in results.items():
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{name}:\n{log}"
        assert "hpcdl: 2 ranks on 1 node(s)" in log and "training ended with status 0" in log, log
        # One job of 2 ranks, not 2 jobs of 1 rank each (the cluster's MpiDefault is none).
        assert log.count(" ranks on ") == 1, log
        assert read_summary(tmp_path / name)["val_acc"] > 0.8
    assert "hpcdl-slurm: launching with srun --mpi=pmi2" in results["srun"][1]
    assert results["cpu"][1].count("no GPU allocated, running on CPU") == 2
    # Same ranks, same answer, whichever launcher; and the one-process reference agrees.
    digests = {read_summary(tmp_path / d)["param_digests"][0] for d in ("srun", "mpirun", "cpu")}
    assert len(digests) == 1
    steps = read_summary(tmp_path / "srun")["step"]
    expected = reference_train(datasets["digits"], DIGITS_MODEL, seed=0, batch=64, steps=steps, lr=LR)
    assert_close_states(final_model(tmp_path / "srun"), expected)
    assert (tmp_path / "srun" / "metrics.jsonl").stat().st_size > 0

    status, out, _ = hpcdl_slurm(capsys, "status", str(jobs["srun"]), "--lines=3")
    assert status == 0
    assert re.match(rf"job {jobs['srun']} \(hpcdl-train\): COMPLETED, exit 0:0, restarts 0, ", out), out
    assert "training ended with status 0" in out.splitlines()[-1]


@pytest.mark.slurm
def test_srun_plugin_that_starts_singletons_is_refused(cluster, capsys, datasets, tmp_path):
    # srun --mpi=none starts 2 processes that MPI sees as 2 jobs of 1 rank: both must refuse to train, and
    # the step ends with the refusal's status whichever exits first (srun --kill-on-bad-exit ends the other).
    args = ("--ntasks-per-node=2", "--knob=SRUN_MPI=none", "--run-dir=singletons", *data_args(datasets, *SGD))
    info, log = finished(submit(capsys, tmp_path, "train", *args))
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert "hpcdl-slurm: launching with srun --mpi=none" in log, log
    refusal = "the launcher started 2 processes (SLURM_STEP_NUM_TASKS=2) but MPI sees each as a job of 1 rank"
    assert log.count(refusal) == 1 and "srun --mpi=pmi2" in log, log  # said once, by process 0
    assert " ranks on " not in log and not (tmp_path / "singletons").exists(), log


@pytest.mark.slurm
def test_signalled_job_checkpoints_requeues_and_resumes_to_the_same_model(cluster, capsys, datasets, tmp_path):
    sets = ("model.hidden=[256,256]", "train.batch_size=32", "train.epochs=20", "train.optimizer='sgd'")
    job = submit(capsys, tmp_path, "train", "--ntasks-per-node=2", "--run-dir=parts", *data_args(datasets, *sets))
    log_has = lambda text: lambda info: text in slurm_cluster.output_tail(info, 200)  # noqa: E731
    slurm_cluster.wait_until(job, log_has("epoch 1 "), JOB_TIMEOUT_S, "training under way")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, timeout=30)
    info = slurm_cluster.wait_until(job, lambda i: i.get("Restarts") == "1", JOB_TIMEOUT_S, "the requeue")
    log = slurm_cluster.output_tail(info, 200)
    assert "USR1: asking the ranks to checkpoint" in log and f"requeueing job {job}" in log, log
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert checkpoint.load(checkpoint.resolve("latest", tmp_path / "parts"))["global_step"] == step
    slurm_cluster.start_now(job)

    # The uninterrupted run, meanwhile, under plain mpiexec with the same ranks and threads.
    whole = tmp_path / "whole"
    result = hpcdl_train(
        2, "digits-mlp", *(a.removeprefix("--set=") for a in data_args(datasets, *sets)), f"run.dir='{whole}'"
    )
    assert result.returncode == 0, result.stderr

    info, log = finished(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert f"resumed at step {step}" in log, log
    assert read_summary(tmp_path / "parts")["param_digests"] == read_summary(whole)["param_digests"]
    assert read_summary(tmp_path / "parts")["step"] == read_summary(whole)["step"] > step


@pytest.mark.slurm
def test_pipeline_template_runs_hybrid(cluster, capsys, datasets, tmp_path):
    job = submit(
        capsys,
        tmp_path,
        "pipeline",
        "--ntasks-per-node=4",
        "--knob=STAGES=2",
        "--knob=MICRO_BATCHES=4",
        "--run-dir=pipe",
        *data_args(datasets, *SGD),
    )
    info, log = finished(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "4 ranks = 2 stages x 2 replicas, 4 micro-batches, 1f1b" in log, log
    assert read_summary(tmp_path / "pipe")["val_acc"] > 0.8
    steps = read_summary(tmp_path / "pipe")["step"]
    expected = reference_train(datasets["digits"], DIGITS_MODEL, seed=0, batch=64, steps=steps, lr=LR)
    assert_close_states(final_model(tmp_path / "pipe"), expected)


@pytest.mark.slurm
def test_sweep_template_trains_its_trials_on_groups(cluster, capsys, datasets, tmp_path):
    grid = "--knob=HPCDL_ARGS=--groups 2 --grid train.lr=0.02,0.05"
    job = submit(capsys, tmp_path, "sweep", "--ntasks-per-node=2", "--run-dir=sweep", grid, *data_args(datasets, *SGD))
    info, log = finished(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "hpcdl sweep: 2 trials on 2 group(s) of 1 rank(s)" in log, log
    trials = json.loads((tmp_path / "sweep" / "results.json").read_text())["trials"]
    assert sorted(t["overrides"]["train.lr"] for t in trials) == ["0.02", "0.05"]
    assert all(t["status"] == "ok" and t["metric"] > 0.5 for t in trials), trials


@pytest.mark.slurm
def test_scaling_array_writes_a_study_that_scale_report_reads(cluster, capsys, datasets, tmp_path):
    job = submit(
        capsys,
        tmp_path,
        "scaling",
        "--array=0-1",
        "--ntasks=2",
        "--config=digits-mlp",
        "--knob=RANKS=1 2",
        "--knob=STEPS=6",
        "--knob=WARMUP=2",
        "--knob=RESULTS=study",
        *data_args(datasets),
    )
    for element in (0, 1):
        info, log = finished(f"{job}_{element}")
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    study = tmp_path / "study"
    runs = {json.loads(p.read_text())["ranks"]: json.loads(p.read_text()) for p in study.glob("run-r*-rep*.json")}
    assert sorted(runs) == [1, 2]
    assert all(run["steps"] == 6 and run["warmup_steps"] == 2 for run in runs.values())
    assert cli.main(["scale", "report", str(study)]) == 0
    with (study / "scaling.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [(row["ranks"], row["speedup"]) for row in rows][:1] == [("1", "1.0")]
    assert [row["ranks"] for row in rows] == ["1", "2"] and float(rows[1]["samples_per_s"]) > 0
    assert (study / "scaling.md").is_file() and (study / "speedup.png").is_file()
