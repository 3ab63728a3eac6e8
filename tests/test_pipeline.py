"""Pipeline parallel equals the unsplit model: gradients, activations held, training, checkpoints, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F

from hpcdl import checkpoint, config
from hpcdl.comm import World
from hpcdl.config import ModelConfig
from hpcdl.errors import ConfigError
from hpcdl.models import MLP, build, is_meta, materialize
from hpcdl.parallel.layout import Layout
from hpcdl.parallel.pipeline.schedule import peak_alive, schedule
from hpcdl.parallel.pipeline.stages import balanced_starts, layer_times, stage_starts, units

from conftest import REPO, hpcdl_train, read_summary, run_mpi
from reference import assert_close_states, reference_train

MODEL = ModelConfig(name="mlp", hidden=[16, 12, 8])
STEPS, BATCH, LR = 12, 48, 0.05


def test_schedules_hold_the_promised_activations():
    for stages, micro in ((2, 8), (4, 8), (4, 3)):
        for stage in range(stages):
            one_f_one_b = schedule("1f1b", stage, stages, micro)
            gpipe = schedule("gpipe", stage, stages, micro)
            for actions in (one_f_one_b, gpipe):
                assert sorted(actions) == sorted([("F", i) for i in range(micro)] + [("B", i) for i in range(micro)])
                assert all(actions.index(("F", i)) < actions.index(("B", i)) for i in range(micro))
            assert peak_alive(one_f_one_b) == min(stages - stage, micro)
            assert peak_alive(gpipe) == micro


def test_cuts_balance_parameters_and_name_the_fix():
    world = World(None, 0, 1, 0, 1, 0, 1)
    with torch.device("meta"):  # cut by shapes alone: nothing is allocated
        layers = list(MLP(1024, [1024] * 7, 1024))  # Flatten + 8 equal Linear layers with ReLUs between
    assert stage_starts(layers, 2, "params", None, world) == [0, 9]  # four Linear layers on each stage
    assert stage_starts(layers, 4, "params", None, world) == [0, 5, 9, 13]
    assert stage_starts(layers, 2, "params", [5], world) == [0, 5]
    assert balanced_starts([1, 1, 1, 9], [0, 1, 2, 3], 2) == [0, 3]
    # Balanced by measured time: the wide layers are the slow ones, so they get a stage of their own.
    with torch.device("meta"):  # timed on allocated copies, one layer at a time
        timed = [torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 512), torch.nn.Linear(512, 512)]
    seconds = layer_times(timed, torch.randn(256, 64))
    assert len(seconds) == 4 and all(s > 0 for s in seconds)  # measured: no assertion on which is slower
    assert all(p.is_meta for layer in timed for p in layer.parameters())
    assert balanced_starts([1.0, 0.0, 2.0, 16.0], units(timed), 2) == [0, 3]  # the heaviest layer alone
    with pytest.raises(ConfigError, match="only 8 layers with parameters .of 16.; use at most 8 stages"):
        Layout("pipeline", 9, stages=9).check_stages(layers)
    with pytest.raises(ConfigError, match=r"parallel.cuts = \[16\] must be 1 increasing layer indices in 1..15"):
        Layout("pipeline", 2, stages=2, cuts=(16,)).check_stages(layers)


@pytest.mark.parametrize("model", [MODEL, ModelConfig(name="cnn", channels=[4, 8], fc=16)])
def test_a_stage_built_alone_equals_its_part_of_the_whole_model(model):
    whole = build(model, (1, 8, 8), 10, seed=3)
    shapes = build(model, (1, 8, 8), 10, seed=3, device="meta")
    assert is_meta(shapes) and not is_meta(whole)
    before = torch.get_rng_state()
    tail = [(i, layer) for i, layer in enumerate(shapes) if i >= len(shapes) // 2]
    materialize(tail, seed=3)  # only the second half: the first stays unallocated
    assert torch.equal(torch.get_rng_state(), before), "allocating a stage must not move the caller's random state"
    first_weighted = next(layer for layer in shapes if list(layer.parameters()))
    assert is_meta(first_weighted) and not any(is_meta(layer) for _, layer in tail)
    for i, layer in tail:
        for name, value in layer.state_dict().items():
            assert torch.equal(value, whole[i].state_dict()[name]), f"layer {i} {name} differs from the whole model's"


def test_stages_match_unsplit_gradients_and_1f1b_holds_at_most_s_micro_batches():
    result = run_mpi(4, str(REPO / "tests/scripts/pipeline_check.py"), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    micro = 6
    for stages in (2, 4):
        assert report[f"S{stages}_gpipe"][0]["peak_alive"] == micro  # GPipe holds all m on the first stage
        assert report[f"S{stages}_1f1b"][0]["peak_alive"] == stages  # 1F1B at most S
    assert [r["peak_alive"] for r in report["S4_1f1b"]] == [4, 3, 2, 1]
    assert [r["layers"] for r in report["S2xR2_1f1b"]] == [[0, 7], [7, 12], [0, 7], [7, 12]]
    assert [r["layers"] for r in report["S4_allocated"]] == [r["layers"] for r in report["S4_1f1b"]]


def _train(ranks, datasets, run_dir, *sets, steps=STEPS, extra=()):
    return hpcdl_train(
        ranks,
        "digits-mlp",
        f"data.path='{datasets['synthetic']}'",
        f"run.dir='{run_dir}'",
        f"model.hidden={MODEL.hidden}",
        f"train.batch_size={BATCH}",
        f"train.max_steps={steps}",
        "train.optimizer='sgd'",
        f"train.lr={LR}",
        "train.epochs=100",
        "parallel.mode='pipeline'",
        *sets,
        extra=extra,
        timeout=240,
    )


def _unsplit_validation(path, state) -> tuple[float, float]:
    """Validation loss and accuracy of the checkpoint loaded into the unsplit model, in one process."""
    with h5py.File(path, "r") as f:
        x, y = torch.from_numpy(f["val/x"][:]), torch.from_numpy(f["val/y"][:])
        classes = int(f.attrs["num_classes"])
    model = build(MODEL, tuple(x.shape[1:]), classes, seed=0)
    checkpoint.restore_model(model, state, "checkpoint")  # strict: the same keys as the unsplit model
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def test_pipeline_training_matches_reference_and_checkpoint_reloads_unsplit(datasets, tmp_path):
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR)
    # 2 stages, GPipe, 4 micro-batches: 12 steps (the last global batch of the epoch is partial).
    result = _train(2, datasets, tmp_path / "s2", "parallel.stages=2", "parallel.micro_batches=4")
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path / "s2"))
    assert_close_states(state["model"], expected)
    summary = read_summary(tmp_path / "s2")
    val_loss, val_acc = _unsplit_validation(datasets["synthetic"], state)
    assert abs(summary["val_loss"] - val_loss) < 1e-5 and abs(summary["val_acc"] - val_acc) < 1e-6


def test_hybrid_then_resume_with_four_stages_matches_reference(datasets, tmp_path):
    expected = reference_train(datasets["synthetic"], MODEL, seed=0, batch=BATCH, steps=STEPS, lr=LR)
    hybrid = ("parallel.stages=2", "parallel.replicas=2", "parallel.micro_batches=3", "parallel.schedule='1f1b'")
    first = _train(4, datasets, tmp_path, *hybrid, steps=6)
    assert first.returncode == 0, first.stderr[-3000:]
    # Resumed in another layout: the checkpoint (model and optimizer) is the unsplit model's.
    four = ("parallel.stages=4", "parallel.micro_batches=4", "parallel.schedule='1f1b'")
    second = _train(4, datasets, tmp_path, *four, extra=("--resume",))
    assert second.returncode == 0, second.stderr[-3000:]
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path))
    assert state["global_step"] == STEPS
    assert_close_states(state["model"], expected)


def test_layout_checks_say_what_would_work():
    def cfg(*sets):
        return config.load("digits-mlp", [f"train.batch_size={BATCH}", *sets])

    def layout(sets, world_size):
        return Layout.from_config(cfg(*sets), world_size)

    assert layout(("parallel.mode='pipeline'", "parallel.stages=2", "parallel.replicas=2"), 4).replicas == 2
    with pytest.raises(ConfigError, match="needs 2 ranks, but the job has 4; use --set parallel.replicas=2"):
        layout(("parallel.mode='pipeline'", "parallel.stages=2"), 4)
    with pytest.raises(ConfigError, match="needs 3 ranks, but the job has 4; run on a multiple of 3"):
        layout(("parallel.mode='pipeline'", "parallel.stages=3"), 4)
    with pytest.raises(ConfigError, match="split into 1 replica.s. x 5 micro-batches; use a multiple of 5 .e.g. 45."):
        layout(("parallel.mode='pipeline'", "parallel.stages=2", "parallel.micro_batches=5"), 2)
    with pytest.raises(ConfigError, match="parallel.stages = 2 takes effect only with parallel.mode = 'pipeline'"):
        layout(("parallel.stages=2",), 2)
    with pytest.raises(ConfigError, match="parallel.schedule = 'zigzag' is not one of gpipe, 1f1b"):
        cfg("parallel.schedule='zigzag'")


@pytest.mark.parametrize(
    "sets, message",
    [
        (("parallel.stages=4",), "parallel.stages = 4 x parallel.replicas = 1 needs 4 ranks, but the job has 2"),
        (
            ("parallel.stages=2", "model.name='rnn'", "model.hidden=[128]", "data.path=SEQUENCES"),
            "needs an nn.Sequential model",
        ),  # fmt: skip
    ],
)
def test_bad_pipeline_layouts_end_every_rank_with_the_fix(datasets, tmp_path, sets, message):
    sets = [s.replace("SEQUENCES", f"'{datasets['sequences']}'") for s in sets]
    result = _train(2, datasets, tmp_path / "run", *sets, steps=2)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert result.stderr.count("hpcdl: error") == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_bench_pipeline_runs_every_engine_and_splits_idle_into_bubble_and_imbalance(tmp_path):
    out = tmp_path / "pipeline.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [
        sys.executable, "-m", "hpcdl", "bench", "pipeline", "--layers", "4", "--width", "32", "--batch", "32",
        "--micro", "4", "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench pipeline hung: {exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["bubble_theory"] == pytest.approx(1 / 5, abs=1e-4)  # (S-1)/(m+S-1) with S=2, m=4
    for kind in ("gpipe", "1f1b"):
        idle = figures[f"idle_per_stage_{kind}"]
        bubble = figures["bubble_measured" if kind == "gpipe" else "bubble_measured_1f1b"]
        assert len(idle) == 2 and all(0 <= i < 1 for i in idle)
        assert bubble == min(idle)  # the least idle stage waits only for fill and drain
        assert figures[f"imbalance_{kind}"] == pytest.approx(sum(idle) / 2 - bubble, abs=2e-4)
        assert figures[f"ratio_vs_torch_{kind}"] > 0 and figures[f"torch_{kind}_samples_per_s"] > 0
    assert figures["hpcdl_gpipe_peak_alive_first_stage"] == 4 and figures["hpcdl_1f1b_peak_alive_first_stage"] == 2
    assert "idle per stage" in done.stdout and "theory (S-1)/(m+S-1) = 20.0%" in done.stdout
