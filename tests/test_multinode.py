"""The multi-node tier: jobs across a real two-node Slurm cluster on this machine (slurm/cluster).

Each node is a network + UTS namespace with its own hostname and boot id and a slurmd of its
own, so MPI sees two hosts and moves bytes between them over TCP, as on a cluster without a
fast interconnect. Every job runs under a timeout; the results are checked against one process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdl import checkpoint, cli
from hpcdl.config import ModelConfig

from conftest import REPO, read_summary, reference_sets
from reference import assert_close_states, reference_train
from slurm_cluster import MULTINODE, output_tail

pytestmark = pytest.mark.multinode
JOB_TIMEOUT_S = 240
MODEL = ModelConfig(name="mlp", hidden=[16, 12, 8])
STEPS, BATCH, LR = 12, 48, 0.05


@pytest.fixture(scope="module")
def cluster(monkeypatch_module):
    """The two-node cluster's client environment (skipped, saying why, where namespaces are not allowed)."""
    reason = MULTINODE.unavailable_reason()
    if reason:
        pytest.skip(reason)
    was_up = MULTINODE.is_up()
    env = {**MULTINODE.ensure(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name, value in env.items():
        monkeypatch_module.setenv(name, value)  # for in-process `hpcdl slurm submit`; jobs inherit it
    yield {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    if not was_up:
        MULTINODE.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def on_nodes(ranks: int, per_node: int, *args: str) -> list[str]:
    """The command that runs `args` on `ranks` ranks, `per_node` on each node of a fresh 2-node allocation.

    mpiexec (MPICH's hydra, which starts its proxies with srun) rather than `srun --mpi=pmi2`: on this
    emulated cluster Slurm 22.05's pmi2 server now and then garbles MPICH 5's segmented start-up values
    ("value not properly terminated"), and MPI_Init then waits forever, before any hpcdl code runs.
    """
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    return ["salloc", "-Q", "-N2", "--time=4", mpiexec, "-n", str(ranks), "-ppn", str(per_node), *args]


def srun(env: dict, cwd: Path, ranks: int, per_node: int, *args: str, timeout: float = 120):
    """Run `args` across the nodes (see `on_nodes`) under a timeout; a hang fails the test."""
    command = on_nodes(ranks, per_node, *args)
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} hung for {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def train_args(data: Path, run_dir: Path, *sets: str) -> list[str]:
    """`python -m hpcdl train` of the reference's model, batch, steps and SGD."""
    args = [sys.executable, "-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1"]
    for assignment in (*reference_sets(data, run_dir, MODEL.hidden, BATCH, STEPS, LR), *sets):
        args += ["--set", assignment]
    return args


def node_pids(node: str) -> list[int]:
    """The processes inside a node's network namespace."""
    return [
        int(pid) for pid in subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    ]


def processes_on(node: str) -> list[str]:
    """The commands of the processes inside a node's network namespace, its slurmd aside."""
    names = []
    for pid in node_pids(node):
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            pass  # ended meanwhile
    return [name for name in names if name != "slurmd"]


def test_node_layout_is_right_on_every_rank(cluster, tmp_path):
    # Uneven on purpose: two ranks on node1, one on node2.
    result = srun(cluster, tmp_path, 3, 2, sys.executable,
                  str(REPO / "tests/scripts/node_layout.py"), str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    places = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(3)]
    assert [p["hostname"] for p in places] == ["node1", "node1", "node2"]
    assert [(p["local_rank"], p["local_size"], p["node"]) for p in places] == [(0, 2, 0), (1, 2, 0), (0, 1, 1)]
    assert {p["num_nodes"] for p in places} == {2}
    assert all(p["hosts"] == ["node1", "node1", "node2"] for p in places)
    assert [p["env"] for p in places] == [
        {"RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(size)}
        for rank, local, size in ((0, 0, 2), (1, 1, 2), (2, 0, 1))
    ]


def test_two_nodes_by_two_ranks_data_parallel_equals_one_process(cluster, datasets, tmp_path):
    result = srun(cluster, tmp_path, 4, 2, *train_args(datasets["synthetic"], tmp_path))
    assert result.returncode == 0, result.stderr
    assert "4 ranks on 2 node(s)" in result.stdout, result.stdout
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR)
    assert_close_states(checkpoint.load(checkpoint.resolve("latest", tmp_path))["model"], expected)
    summary = read_summary(tmp_path)
    assert summary["nodes"] == 2 and len(set(summary["param_digests"])) == 1


def test_pipeline_with_one_stage_per_node_equals_the_unsplit_model(cluster, datasets, tmp_path):
    pipeline = ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.micro_batches=4")
    result = srun(cluster, tmp_path, 2, 1, *train_args(datasets["synthetic"], tmp_path, *pipeline))
    assert result.returncode == 0, result.stderr
    assert "2 ranks on 2 node(s)" in result.stdout, result.stdout
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR)
    assert_close_states(checkpoint.load(checkpoint.resolve("latest", tmp_path))["model"], expected)


def submit_train(capsys, tmp_path: Path, datasets, *args: str) -> int:
    """`hpcdl slurm submit train` on both nodes, two ranks each, launched by mpirun (see `on_nodes`); its job id."""
    sets = ["train.batch_size=32", "train.optimizer='sgd'", "run.progress=false", "model.hidden=[256,256]"]
    argv = ["slurm", "submit", "train", "--nodes=2", "--ntasks-per-node=2", "--time=5", "--launcher=mpirun",
            f"--output={tmp_path}/slurm-%j.out", f"--sbatch=--chdir={tmp_path}",
            f"--set=data.path='{datasets['digits']}'", *(f"--set={s}" for s in sets), *args]  # fmt: skip
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    return int(out.strip().splitlines()[-1].removeprefix("submitted job "))


def test_train_template_on_two_nodes_requeues_and_resumes_to_the_same_model(cluster, capsys, datasets, tmp_path):
    # 8 epochs: the signal, sent once epoch 1 is logged, lands well before the end (an epoch takes 1-2 s here).
    job = submit_train(capsys, tmp_path, datasets, "--run-dir=parts", "--set=train.epochs=8")
    log_has = lambda text: lambda info: text in output_tail(info, 200)  # noqa: E731
    MULTINODE.wait_until(job, log_has("epoch 1 "), JOB_TIMEOUT_S, "training under way")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, timeout=30, env=cluster)
    MULTINODE.wait_until(job, lambda i: i.get("Restarts") == "1", JOB_TIMEOUT_S, "the requeue")
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "on 2 node(s), 4 ranks" in log and f"requeueing job {job}" in log, log
    step = int(re.search(r"stopped by SIGUSR1 at step (\d+)", log).group(1))
    MULTINODE.start_now(job)

    # The uninterrupted run, meanwhile, on the same two nodes with the same layout.
    whole = tmp_path / "whole"
    sets = ["--set", f"data.path='{datasets['digits']}'", "--set", f"run.dir='{whole}'", "--set", "train.epochs=8"]
    for assignment in ("train.batch_size=32", "train.optimizer='sgd'", "run.progress=false", "model.hidden=[256,256]"):
        sets += ["--set", assignment]
    result = srun(cluster, tmp_path, 4, 2, sys.executable, "-m", "hpcdl", "train",
                  "--config", "digits-mlp", "--threads", "1", *sets, timeout=JOB_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr

    info = MULTINODE.wait_job(job, JOB_TIMEOUT_S)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert f"resumed at step {step}" in log, log
    assert read_summary(tmp_path / "parts")["param_digests"] == read_summary(whole)["param_digests"]
    assert read_summary(tmp_path / "parts")["step"] == read_summary(whole)["step"] > step


def test_rank_killed_on_one_node_ends_the_job_on_both(cluster, capsys, datasets, tmp_path):
    job = submit_train(capsys, tmp_path, datasets, "--set=train.epochs=50", "--knob=HPCDL_ARGS=--fault kill@3:4")
    info = MULTINODE.wait_job(job, JOB_TIMEOUT_S)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED", log
    assert "injecting kill on rank 3" in log and "RUNNING AT node2" in log, log
    assert "watchdog" not in log, log  # the launcher ended the job; nobody waited for the watchdog's limit
    deadline = time.monotonic() + 15
    while any(processes_on(node) for node in ("node1", "node2")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(processes_on(node) for node in ("node1", "node2")), "processes outlived the job"


def test_watchdog_names_the_node_of_a_stopped_rank(cluster, datasets, tmp_path):
    args = train_args(datasets["digits"], tmp_path, "run.watchdog_s=4", "train.max_steps=100000", "train.batch_size=8")
    command = on_nodes(2, 1, *args)
    with subprocess.Popen(command, cwd=tmp_path, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as job:  # fmt: skip
        # Stopped only once training is under way: the watchdog watches steps (start-up has its own limit).
        deadline = time.monotonic() + 120  # the allocation may wait for the previous job's nodes
        while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert (tmp_path / "metrics.jsonl").is_file(), "training did not get under way"
        stopped = [pid for pid in node_pids("node2") if Path(f"/proc/{pid}/comm").read_text().startswith("python")]
        assert stopped, "no rank running on node2"
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            out, err = job.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
            out, err = job.communicate()
            pytest.fail(f"the job did not end after a rank on node2 was stopped:\n{err[-3000:]}")
    assert job.returncode != 0
    assert "rank(s) 1 on node2 did not arrive at the step's communication" in err, err
    assert "rank 1 on node2: no report" in err and "rank 0 on node1: step" in err, err


def test_bench_comm_between_nodes_recovers_the_throttled_link(cluster, tmp_path):
    throttle = subprocess.run([str(MULTINODE.scripts / "up.sh")], env={**cluster, "NODES": "2", "LINK": "100mbit"},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert throttle.returncode == 0, throttle.stdout + throttle.stderr
        result = subprocess.run(
            ["salloc", "-Q", "-N2", "--time=3", sys.executable, "-m", "hpcdl", "bench", "comm", "--launcher", "mpiexec",
             "--per-node", "1", "--max-bytes", "262144", "--max-calls", "30", "--json", str(tmp_path / "comm.json")],
            env=cluster, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    finally:
        subprocess.run([str(MULTINODE.scripts / "up.sh")], env={**cluster, "NODES": "2", "LINK": ""},
                       capture_output=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads((tmp_path / "comm.json").read_text())
    assert measured["nodes"] == 2 and measured["ranks"] == 2
    link_beta = 8 / 100e6  # seconds per byte of a 100 Mbit/s link
    for op in ("allreduce", "bcast", "allgather"):
        fit = measured["ops"][op]["fit"]
        # The throttle holds: no collective moves bytes faster than the link (measured within 5% of it, quiet;
        # a busy machine can only make it slower).
        assert fit["beta_s_per_byte"] > 0.85 * link_beta, (op, fit)


def test_cluster_scripts_are_idempotent_and_down_leaves_nothing(cluster):
    state = MULTINODE.state_dir()
    pids = {path.name: path.read_text() for path in sorted(state.glob("*.pid"))}
    again = subprocess.run([str(MULTINODE.scripts / "up.sh")], env={**cluster, "NODES": "2", "LINK": ""},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and "2 nodes up" in again.stdout, again.stdout + again.stderr
    assert {path.name: path.read_text() for path in sorted(state.glob("*.pid"))} == pids, "up.sh restarted daemons"

    MULTINODE.stop()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(r"^node\d+", namespaces, re.MULTILINE), namespaces
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert "hpcdl-br0" not in links and "hpcdl-n1" not in links, links
    for pid in pids.values():
        assert not Path(f"/proc/{pid.strip()}").exists(), f"process {pid.strip()} outlived cluster-down"
    assert not list(state.glob("*.pid")) and not Path("/etc/netns/node1").exists()
    down_again = subprocess.run([str(MULTINODE.scripts / "down.sh")], capture_output=True, text=True, timeout=60)
    assert down_again.returncode == 0, down_again.stderr
