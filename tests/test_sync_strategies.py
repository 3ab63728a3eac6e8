"""Parameter servers and local SGD against one process, a simulation, each other, and the fault table's rows.

ps-sync equals the single-process reference with 1 and 2 servers at 3 and 4 ranks; local SGD with H = 1
equals it too (SGD with momentum is linear in the gradient), and with H = 4 (after 2 post-local
data-parallel steps) equals a plain torch simulation of its ranks; ps-async converges with every applied
gradient within max_staleness; a killed rank ends each mode's job and a signal checkpoints it; both resume.
"""

from __future__ import annotations

import json
import math
import shutil
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
# Every mode as the kill-and-signal test runs it; checkpoints every 4 steps change no weight, so the same runs serve
# as the uninterrupted ones of the tests that check a mode's result.
PS_SYNC = ("parallel.mode='ps-sync'", "run.checkpoint_every=4")
MODES = {
    "ps-sync": (*PS_SYNC, "parallel.servers=1"),
    "ps-async": (
        "parallel.mode='ps-async'", "parallel.deterministic=true", "parallel.max_staleness=0", "run.checkpoint_every=4"
    ),
    "local-sgd": (
        "parallel.mode='local-sgd'", "parallel.local_steps=4", "parallel.post_local_steps=2", "run.checkpoint_every=4"
    ),
}  # fmt: skip


def train_strategy(datasets, run_dir: Path, ranks: int, *sets: str, extra: tuple[str, ...] = ()):
    """hpcdl train on the synthetic set with the reference's model, batch, steps and SGD, plus `sets`."""
    base = reference_sets(datasets["synthetic"], run_dir, HIDDEN, BATCH, STEPS, LR)
    return hpcdl_train(ranks, "digits-mlp", *base, *sets, extra=extra)


def final_state(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.resolve("latest", run_dir))


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    """`trained(ranks, *sets)`: the folder of a finished run of that layout, trained once for the module (one
    launch less for each test that only reads it)."""
    runs: dict[tuple, Path] = {}

    def train(ranks: int, *sets: str) -> Path:
        key = (ranks, *sorted(sets))
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("trained")
            result = train_strategy(datasets, run_dir, ranks, *sets)
            assert result.returncode == 0, result.stderr
            runs[key] = run_dir
        return runs[key]

    return train


@pytest.fixture(scope="module")
def stopped(datasets, tmp_path_factory):
    """`stopped(mode)`: the folder of a 3-rank run of MODES[mode] whose first rank was killed at step 6 (a server,
    in the server modes), then resumed from step 4 and stopped by a signal to one rank at step 7, where every rank
    checkpoints. Made once per mode; tests resume copies of it."""
    runs: dict[str, Path] = {}

    def stop(mode: str) -> Path:
        if mode in runs:
            return runs[mode]
        run_dir = tmp_path_factory.mktemp("stopped") / "run"
        args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1", "--resume", "auto"]
        for assignment in (*reference_sets(datasets["synthetic"], run_dir, HIDDEN, BATCH, STEPS, LR), *MODES[mode]):
            args += ["--set", assignment]
        status, _, stderr, seconds = run_watched(3, [*args, "--fault", "kill@0:6"], "injecting kill")
        assert status != 0 and seconds < 15, f"{seconds} s\n{stderr}"
        # Step 7 lies between local SGD's averages (after steps 6 and 10).
        result = train_strategy(datasets, run_dir, 3, *MODES[mode], extra=("--resume", "auto", "--fault", "signal@2:7"))
        assert result.returncode == EXIT_REQUEUE, result.stderr
        assert "resumed at step 4" in result.stdout and "stopped by SIGUSR1 at step 7" in result.stdout
        runs[mode] = run_dir
        return run_dir

    return stop


def resume_a_copy(datasets, stopped_run: Path, copy: Path, ranks: int, *sets: str):
    """`--resume auto` on `ranks` ranks of a copy of a stopped run (which other tests resume too)."""
    shutil.copytree(stopped_run, copy)
    return train_strategy(datasets, copy, ranks, *sets, extra=("--resume", "auto"))


@pytest.fixture(scope="module")
def expected(datasets) -> dict[str, torch.Tensor]:
    """The single-process reference every synchronous layout must reproduce."""
    return reference_train(datasets["synthetic"], ModelConfig(hidden=HIDDEN), seed=0, batch=BATCH, steps=STEPS, lr=LR)


@pytest.mark.parametrize(("ranks", "servers"), [(3, 1), (4, 2)])  # (3, 1) is also the kill test's uninterrupted run
def test_ps_sync_matches_one_process(trained, expected, ranks, servers):
    state = final_state(trained(ranks, *PS_SYNC, f"parallel.servers={servers}"))
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


def test_local_sgd_equals_a_simulation_of_its_ranks(datasets, trained):
    run_dir = trained(3, *MODES["local-sgd"])
    state = final_state(run_dir)
    simulated = simulate_local_sgd(datasets["synthetic"], 3, local_steps=4, post_local=2)
    # Averages after steps 6 and 10; steps 11-12 are local: each rank's own weights, and their average as the model.
    local = state["local"]
    assert local["world_size"] == 3 and local["updates"] == STEPS
    for rank, own in enumerate(local["ranks"]):
        assert_close_states(own["model"], simulated[rank])
    average = {key: torch.stack([s[key] for s in simulated]).mean(0) for key in simulated[0]}
    assert_close_states(state["model"], average)
    assert read_summary(run_dir)["local_sgd"]["averages"] == 2


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


def test_ps_async_deterministic_mode_repeats_itself(datasets, trained, tmp_path):
    first = trained(3, *MODES["ps-async"])
    result = train_strategy(datasets, tmp_path, 3, *MODES["ps-async"])
    assert result.returncode == 0, result.stderr
    assert read_summary(tmp_path)["param_digests"][0] == read_summary(first)["param_digests"][0]
    # max_staleness 0, 2 workers in order: each gradient was computed before the other worker's last update,
    # so each is computed again on fresh parameters, but the very first one (both start at version 0).
    assert read_summary(first)["recomputed_pushes"] == 2 * STEPS - 1
    assert read_summary(first)["staleness_histogram"] == {"0": 2 * STEPS}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_kill_and_signal_end_every_rank_and_resume(datasets, trained, stopped, tmp_path, mode):
    result = resume_a_copy(datasets, stopped(mode), tmp_path / "run", 3, *MODES[mode])
    assert result.returncode == 0, result.stderr
    assert read_summary(tmp_path / "run")["step"] == STEPS
    if mode != "ps-async":  # a server's update count restarts with the job: async staleness differs
        whole = trained(3, *MODES[mode])
        assert read_summary(tmp_path / "run")["param_digests"] == read_summary(whole)["param_digests"]


def test_ps_sync_resumes_on_other_ranks_and_servers(datasets, expected, stopped, tmp_path):
    # Saved at step 7 by 3 ranks, one of them a server; continued by 4 ranks, two of them servers.
    result = resume_a_copy(datasets, stopped("ps-sync"), tmp_path / "run", 4, *PS_SYNC, "parallel.servers=2")
    assert result.returncode == 0, result.stderr
    assert "resumed at step 7" in result.stdout
    assert_close_states(final_state(tmp_path / "run")["model"], expected)


def test_local_sgd_resumes_elastically_from_the_average(datasets, stopped, tmp_path):
    saved = final_state(stopped("local-sgd"))
    result = resume_a_copy(datasets, stopped("local-sgd"), tmp_path / "run", 2, *MODES["local-sgd"])
    assert result.returncode == 0, result.stderr
    assert "resumed at step 7" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == STEPS and saved["local"]["world_size"] == 3
