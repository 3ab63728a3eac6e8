"""Parameter servers and local SGD against one process, a simulation, each other, and the fault table's rows.

ps-sync equals the single-process reference with 1 and 2 servers at 3 and 4 ranks; local SGD with H = 1
equals it too (SGD with momentum is linear in the gradient), and with H = 4 (after 2 post-local
data-parallel steps) equals a plain torch simulation of its ranks; ps-async converges with every applied
gradient within max_staleness; a killed rank ends each mode's job and a signal checkpoints it; both resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcdl import checkpoint
from hpcdl.comm import EXIT_REQUEUE
from hpcdl.config import ModelConfig
from hpcdl.models import build

from conftest import hpcdl_train, read_summary, reference_sets, run_watched
from reference import assert_close_states, reference_train

HIDDEN, STEPS, BATCH, LR = [16, 8], 12, 48, 0.05


def train_strategy(datasets, run_dir: Path, ranks: int, *sets: str, extra: tuple[str, ...] = ()):
    """hpcdl train on the synthetic set with the reference's model, batch, steps and SGD, plus `sets`."""
    base = reference_sets(datasets["synthetic"], run_dir, HIDDEN, BATCH, STEPS, LR)
    return hpcdl_train(ranks, "digits-mlp", *base, *sets, extra=extra)


def final_state(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.resolve("latest", run_dir))


@pytest.fixture(scope="module")
def expected(datasets) -> dict[str, torch.Tensor]:
    """The single-process reference every synchronous layout must reproduce."""
    return reference_train(datasets["synthetic"], ModelConfig(hidden=HIDDEN), seed=0, batch=BATCH, steps=STEPS, lr=LR)


@pytest.mark.parametrize(("ranks", "servers"), [(3, 1), (3, 2), (4, 1), (4, 2)])
def test_ps_sync_matches_one_process(datasets, expected, tmp_path, ranks, servers):
    result = train_strategy(datasets, tmp_path, ranks, "parallel.mode='ps-sync'", f"parallel.servers={servers}")
    assert result.returncode == 0, result.stderr
    state = final_state(tmp_path)
    assert state["global_step"] == STEPS
    assert_close_states(state["model"], expected)
    # The servers' optimizer states, joined, are the unsplit model's: one momentum buffer per parameter.
    assert sorted(state["optimizer"]["state"]) == list(range(len(expected)))


def test_local_sgd_with_one_local_step_is_data_parallel(datasets, expected, tmp_path):
    result = train_strategy(datasets, tmp_path, 3, "parallel.mode='local-sgd'", "parallel.local_steps=1")
    assert result.returncode == 0, result.stderr
    assert_close_states(final_state(tmp_path)["model"], expected)
    assert read_summary(tmp_path)["local_sgd"]["averages"] == STEPS


def simulate_local_sgd(path: Path, ranks: int, local_steps: int, post_local: int) -> list[torch.Tensor]:
    """`ranks` plain torch models: data parallel for `post_local` steps, then each on its own rows
    (its share of every global batch, loss = its rows' sum / global batch x ranks), averaged every
    `local_steps` steps. Returns each rank's final state."""
    with h5py.File(path, "r") as f:
        x, y = torch.from_numpy(f["train/x"][:]), torch.from_numpy(f["train/y"][:])
        classes = int(f.attrs["num_classes"])
    models = [build(ModelConfig(hidden=HIDDEN), tuple(x.shape[1:]), classes, 0) for _ in range(ranks)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for m in models]
    steps_per_epoch = math.ceil(len(y) / BATCH)
    for step in range(STEPS):
        epoch, index = divmod(step, steps_per_epoch)
        order = np.random.default_rng([0, epoch]).permutation(len(y))
        batch = order[index * BATCH : (index + 1) * BATCH]
        shares = np.array_split(batch, ranks)
        for model in models:
            model.zero_grad()
        if step < post_local:  # data parallel: every model gets the global batch's mean gradient
            for model in models:
                F.cross_entropy(model(x[batch]), y[batch]).backward()
        else:
            for model, rows in zip(models, shares):
                (F.cross_entropy(model(x[rows]), y[rows], reduction="sum") / len(batch) * ranks).backward()
        for optimizer in optimizers:
            optimizer.step()
        if step + 1 > post_local and (step + 1 - post_local) % local_steps == 0:
            with torch.no_grad():
                for tensors in zip(*(m.parameters() for m in models)):
                    mean = torch.stack(tensors).mean(0)
                    for t in tensors:
                        t.copy_(mean)
    return [m.state_dict() for m in models]


def test_local_sgd_equals_a_simulation_of_its_ranks(datasets, tmp_path):
    sets = ("parallel.mode='local-sgd'", "parallel.local_steps=4", "parallel.post_local_steps=2")
    result = train_strategy(datasets, tmp_path, 3, *sets)
    assert result.returncode == 0, result.stderr
    state = final_state(tmp_path)
    simulated = simulate_local_sgd(datasets["synthetic"], 3, local_steps=4, post_local=2)
    # Averages after steps 6 and 10; steps 11-12 are local: each rank's own weights, and their average as the model.
    local = state["local"]
    assert local["world_size"] == 3 and local["updates"] == STEPS
    for rank, own in enumerate(local["ranks"]):
        assert_close_states(own["model"], simulated[rank])
    average = {key: torch.stack([s[key] for s in simulated]).mean(0) for key in simulated[0]}
    assert_close_states(state["model"], average)
    assert read_summary(tmp_path)["local_sgd"]["averages"] == 2


@pytest.mark.parametrize("ranks", [3, 4])
def test_ps_async_converges_within_its_staleness_bound(datasets, tmp_path, ranks):
    workers = ranks - 1
    sets = (
        f"data.path='{datasets['digits']}'", f"run.dir='{tmp_path}'", "model.hidden=[32]",
        f"train.batch_size={16 * workers}", "train.epochs=2", "train.lr=0.01", "run.progress=false",
        "parallel.mode='ps-async'", "parallel.max_staleness=1",
    )  # fmt: skip
    result = hpcdl_train(ranks, "digits-mlp", *sets)
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path)
    histogram = {int(k): v for k, v in summary["staleness_histogram"].items()}
    assert max(histogram) <= 1, histogram
    # Each worker's gradient is applied once per step: workers x steps updates in all.
    assert sum(histogram.values()) == workers * summary["step"], histogram
    assert summary["val_acc"] >= 0.85, summary["val_acc"]  # one run at 3 workers: 0.68 with Adam at lr 0.05


def test_ps_async_deterministic_mode_repeats_itself(datasets, tmp_path):
    digests = []
    for run in ("a", "b"):
        result = train_strategy(
            datasets, tmp_path / run, 3, "parallel.mode='ps-async'", "parallel.deterministic=true",
            "parallel.max_staleness=0", "train.batch_size=48",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        digests.append(read_summary(tmp_path / run)["param_digests"][0])
    assert digests[0] == digests[1]
    # max_staleness 0, 2 workers in order: each gradient was computed before the other worker's last update,
    # so each is computed again on fresh parameters, but the very first one (both start at version 0).
    assert read_summary(tmp_path / "a")["recomputed_pushes"] == 2 * STEPS - 1
    assert read_summary(tmp_path / "a")["staleness_histogram"] == {"0": 2 * STEPS}


MODES = {
    "ps-sync": ("parallel.mode='ps-sync'",),
    "ps-async": ("parallel.mode='ps-async'", "parallel.deterministic=true"),
    "local-sgd": ("parallel.mode='local-sgd'", "parallel.local_steps=4"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_kill_and_signal_end_every_rank_and_resume(datasets, tmp_path, mode):
    sets = (*MODES[mode], "run.checkpoint_every=4", "train.batch_size=48")
    whole = tmp_path / "whole"
    assert train_strategy(datasets, whole, 3, *sets).returncode == 0
    run_dir = tmp_path / "run"
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1", "--resume", "auto"]
    for assignment in (*reference_sets(datasets["synthetic"], run_dir, HIDDEN, BATCH, STEPS, LR), *sets):
        args += ["--set", assignment]
    # The first rank holds parameters in the server modes: a server dies.
    status, _, stderr, seconds = run_watched(3, [*args, "--fault", "kill@0:6"], "injecting kill")
    assert status != 0 and seconds < 15, f"{seconds} s\n{stderr}"
    # A signal to one rank between local SGD's averages (step 7): every rank checkpoints at the same step.
    result = train_strategy(datasets, run_dir, 3, *sets, extra=("--resume", "auto", "--fault", "signal@2:7"))
    assert result.returncode == EXIT_REQUEUE, result.stderr
    assert "resumed at step 4" in result.stdout and "stopped by SIGUSR1 at step 7" in result.stdout
    result = train_strategy(datasets, run_dir, 3, *sets, extra=("--resume", "auto"))
    assert result.returncode == 0, result.stderr
    assert read_summary(run_dir)["step"] == STEPS
    if mode != "ps-async":  # a server's update count restarts with the job: async staleness differs
        assert read_summary(run_dir)["param_digests"] == read_summary(whole)["param_digests"]


def test_ps_sync_resumes_on_other_ranks_and_servers(datasets, expected, tmp_path):
    sets = ("parallel.mode='ps-sync'", "run.checkpoint_every=4")
    result = train_strategy(datasets, tmp_path, 3, *sets, extra=("--fault", "signal@1:6"))
    assert result.returncode == EXIT_REQUEUE, result.stderr
    result = train_strategy(datasets, tmp_path, 4, *sets, "parallel.servers=2", extra=("--resume", "auto"))
    assert result.returncode == 0, result.stderr
    assert "resumed at step 6" in result.stdout
    assert_close_states(final_state(tmp_path)["model"], expected)


def test_local_sgd_resumes_elastically_from_the_average(datasets, tmp_path):
    sets = ("parallel.mode='local-sgd'", "parallel.local_steps=4")
    result = train_strategy(datasets, tmp_path, 3, *sets, extra=("--fault", "signal@0:6"))
    assert result.returncode == EXIT_REQUEUE, result.stderr
    saved = final_state(tmp_path)
    result = train_strategy(datasets, tmp_path, 2, *sets, extra=("--resume", "auto"))
    assert result.returncode == 0, result.stderr
    assert "resumed at step 6" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == STEPS and saved["local"]["world_size"] == 3
