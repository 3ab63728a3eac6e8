"""On a GPU (skipped without one; tests/gpu/run.sh runs them): N ranks on GPUs equal one GPU process, through both
MPI paths (staged through pinned host memory; handed over directly where MPI is CUDA-aware), pipeline and tensor
parallel, mixed precision, a Horovod GPU script, and the GPU Slurm template's binding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hpcdl import checkpoint
from hpcdl.config import ModelConfig
from hpcdl.device import CUDA_AWARE_ENV

from conftest import REPO, read_summary, run_mpi
from reference import assert_close_states, reference_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: tests/gpu/run.sh runs these on one"),
]
MODEL = ModelConfig(name="mlp", hidden=[16, 8])
STEPS, BATCH, LR = 12, 48, 0.05
MODES = {
    "data": (),
    "pipeline": ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.micro_batches=3"),
    "tensor": ("parallel.mode='tensor'", "parallel.tensor=2"),
}


def gpu_train(ranks: int, data, run_dir, *sets: str, env: dict | None = None) -> dict:
    """`hpcdl train` on `ranks` ranks with train.device = cuda (ranks share the GPUs when they outnumber them)."""
    settings = (
        f"data.path='{data}'", f"run.dir='{run_dir}'", f"model.hidden={MODEL.hidden}", f"train.batch_size={BATCH}",
        f"train.max_steps={STEPS}", "train.optimizer='sgd'", f"train.lr={LR}", "train.epochs=100",
        "run.progress=false", "train.device='cuda'", *sets,
    )  # fmt: skip
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1"]
    result = run_mpi(ranks, *args, *(a for s in settings for a in ("--set", s)), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert summary["device"] == "cuda" and len(summary["devices"]) == ranks, summary
    assert all(d.startswith("cuda:") for d in summary["devices"]) and min(summary["gpu_memory_peak_mb"]) > 0
    return summary


def final_model(run_dir) -> dict:
    return checkpoint.load(checkpoint.resolve("latest", run_dir))["model"]


def mpi_is_cuda_aware() -> bool:
    """Asked of the MPI library in a process of its own (importing MPI here would start it in pytest)."""
    probe = "from hpcdl.device import cuda_aware_mpi; print(cuda_aware_mpi())"
    env = {k: v for k, v in os.environ.items() if k != CUDA_AWARE_ENV}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_two_ranks_on_gpus_equal_one_gpu_process(datasets, tmp_path, path):
    if path == "direct" and not mpi_is_cuda_aware():
        pytest.skip("this MPI library is not CUDA-aware: GPU buffers cannot go to MPI directly")
    env = {CUDA_AWARE_ENV: "0" if path == "staged" else "1"}
    summary = gpu_train(2, datasets["synthetic"], tmp_path, "parallel.bucket_mb=0.002", env=env)
    assert summary["mpi_transport"] == path
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR, device="cuda")
    assert_close_states(final_model(tmp_path), expected)
    assert len(set(summary["param_digests"])) == 1, "the replicas differ"


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_pipeline_and_tensor_parallel_on_gpus_equal_the_unsplit_model(datasets, tmp_path, mode):
    gpu_train(2, datasets["synthetic"], tmp_path, *MODES[mode])
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR, device="cuda")
    assert_close_states(final_model(tmp_path), expected)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpus_stays_near_fp32(datasets, tmp_path, precision):
    gpu_train(2, datasets["synthetic"], tmp_path, f"train.precision='{precision}'")
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR, device="cuda")
    # The CPU test's bound (tests/test_training_essentials.py): a few 1e-3 after 12 steps.
    assert_close_states(final_model(tmp_path), expected, atol=2e-2, rtol=0)


def test_a_horovod_gpu_script_runs_on_cuda_tensors():
    result = run_mpi(2, str(REPO / "tests" / "gpu" / "horovod_gpu.py"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "horovod on GPU: ok" in result.stdout, result.stdout


def test_the_gpu_template_binds_one_rank_per_gpu_and_the_run_shows_it(datasets, tmp_path):
    """slurm/train-gpu.sbatch run by bash with the variables Slurm would set (no Slurm on the GPU machine)."""
    gpus = ",".join(str(i) for i in range(torch.cuda.device_count()))
    run_dir = tmp_path / "run"
    env = {
        **os.environ, "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "gpu", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
        "SLURM_CPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": gpus, "LAUNCHER": "mpirun", "RUN_DIR": str(run_dir),
        "HPCDL_PYTHON": sys.executable,
        "HPCDL_ARGS": f"--set data.path='{datasets['synthetic']}' --set train.max_steps=4 --set run.progress=false "
                      "--set model.hidden=[16,8]",
    }  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "train-gpu.sbatch")], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local rank 0 -> GPU" in result.stdout and "local rank 1 -> GPU" in result.stdout, result.stdout
    summary = read_summary(run_dir)
    assert summary["device"] == "cuda" and len(summary["devices"]) == 2, summary
    assert min(summary["gpu_memory_peak_mb"]) > 0
