"""train.device on machines without a GPU: the choice of each rank's GPU, one clear line when none is found,
and the GPU path's host staging run on CPU tensors (HPCDL_CUDA_AWARE_MPI=0), bitwise equal to host memory.

The GPU itself is tested by tests/gpu/ (run.sh), skipped here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hpcdl.device import CPU, CUDA_AWARE_ENV, Transport, no_gpu_reason, select_device
from hpcdl.errors import HpcdlError

from conftest import REPO, assert_one_line, hpcdl_train, read_summary, run_mpi

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")


def test_each_rank_takes_its_node_local_gpu_and_ranks_share_when_they_outnumber_them():
    assert [select_device("auto", local, gpus=4).index for local in range(6)] == [0, 1, 2, 3, 0, 1]
    # A launcher that binds one GPU per rank (CUDA_VISIBLE_DEVICES=<one id>) leaves each rank cuda:0.
    assert {select_device("cuda", local, gpus=1) for local in range(4)} == {torch.device("cuda", 0)}
    assert select_device("cpu", 3, gpus=4) == CPU
    assert select_device("auto", 2, gpus=0) == CPU
    with pytest.raises(HpcdlError, match="no GPU was found"):
        select_device("cuda", 0, gpus=0)


def test_the_reason_no_gpu_was_found_says_what_to_change(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "built without CUDA" in no_gpu_reason()
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert no_gpu_reason() == "CUDA_VISIBLE_DEVICES is empty"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "torch.cuda.is_available() is False" in no_gpu_reason()


@NO_GPU
def test_cuda_without_a_gpu_ends_every_rank_with_one_line_and_writes_nothing(datasets, tmp_path):
    common = (f"data.path='{datasets['digits']}'", "train.device='cuda'")
    result = hpcdl_train(2, "digits-mlp", *common, f"run.dir='{tmp_path / 'gpu'}'")
    assert_one_line(result, 'train.device = "cuda", but no GPU was found')
    assert 'use train.device = "cpu"' in result.stderr
    result = hpcdl_train(2, "digits-mlp", *common, "parallel.mode='zero'", f"run.dir='{tmp_path / 'zero'}'")
    assert_one_line(result, 'parallel.mode = "zero" trains on CPU only so far')
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "zero").exists()
    bench = subprocess.run(
        [sys.executable, "-m", "hpcdl", "bench", "dp", "--device", "cuda"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert_one_line(bench, "hpcdl bench dp --device cuda, but no GPU was found")


def test_a_staged_transport_moves_the_same_values_as_host_memory():
    tensor = torch.arange(6, dtype=torch.float32)
    staged = Transport(CPU, staged=True)
    mirror = staged.mirror(tensor)
    assert mirror is not tensor and staged.name == "staged" and Transport(CPU, staged=False).name == "host"
    assert staged.ready(staged.to_host(tensor, mirror)) and torch.equal(mirror, tensor)
    with staged.for_mpi(tensor) as memory:
        assert memory.data_ptr() != tensor.data_ptr()
        memory.mul_(2)  # what an MPI reduction would write into the host copy
    assert torch.equal(tensor, torch.arange(6, dtype=torch.float32) * 2)


# Gradient buckets (several, tiny), broadcasts, pipeline sends/receives and tensor-parallel sums, staged.
LAYOUTS = {
    "data": (3, ("parallel.bucket_mb=0.002",)),
    "pipeline": (2, ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.micro_batches=2")),
    "tensor": (2, ("parallel.mode='tensor'", "parallel.tensor=2")),
}  # fmt: skip


@pytest.mark.parametrize("mode", sorted(LAYOUTS))
def test_staging_through_host_copies_trains_bitwise_as_host_memory(datasets, tmp_path, mode):
    ranks, layout = LAYOUTS[mode]
    digests = {}
    for name, env in (("host", {}), ("staged", {CUDA_AWARE_ENV: "0"})):
        run_dir = tmp_path / name
        sets = (
            f"data.path='{datasets['synthetic']}'", f"run.dir='{run_dir}'", "model.hidden=[16, 8]",
            "train.batch_size=48", "train.max_steps=4", "train.epochs=100", "run.progress=false",
            "train.device='cpu'", *layout,
        )  # fmt: skip
        args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1"]
        result = run_mpi(ranks, *args, *(a for s in sets for a in ("--set", s)), env=env)
        assert result.returncode == 0, result.stderr
        summary = read_summary(run_dir)
        assert summary["mpi_transport"] == name and summary["device"] == "cpu"
        digests[name] = summary["param_digests"]
    assert digests["staged"] == digests["host"]
