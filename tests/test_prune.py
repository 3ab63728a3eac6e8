"""Pruning: the global threshold exact at any split, masks kept through SGD/Adam steps and a resume, and
structured pruning into a smaller MLP with the masked model's outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hpcdl import checkpoint
from hpcdl.comm import EXIT_REQUEUE
from hpcdl.compress import prune
from hpcdl.config import ModelConfig
from hpcdl.models import build

from conftest import REPO, assert_one_line, hpcdl_train, read_summary, run_mpi

SCRIPT = str(REPO / "tests" / "scripts" / "prune_threshold.py")


def test_threshold_is_the_kth_smallest_magnitude_over_mixed_dtypes_and_ties_are_all_pruned():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(30, 40, generator=generator), torch.randn(7, 5, generator=generator).double() * 3,
             torch.randn(9, 4, generator=generator).bfloat16()]  # fmt: skip
    every = torch.cat([t.abs().double().reshape(-1) for t in parts]).sort().values
    for k in (1, 2, 500, 1234, every.numel()):
        assert prune.kth_smallest_abs([(t, False) for t in parts], k).item() == every[k - 1].item()
    tied = [torch.tensor([[0.5, -0.5, 0.5], [0.1, 2.0, -3.0]])]
    threshold, k = prune.global_threshold([(tied[0], False)], 0.5)  # k = 3: the 0.1 and two of the three 0.5s
    assert (k, threshold.item()) == (3, 0.5)
    assert prune.count([(tied[0], False)], None, lambda t: prune.magnitude(t) <= threshold) == 4  # ties: all


def test_cubic_ramp_and_its_update_steps():
    cfg = prune.PruneConfig(final_sparsity=0.8, start=10, end=20, every=4)
    assert prune.points(cfg) == [10, 14, 18, 20]
    assert prune.ramp(cfg, 5) == 0.0 and prune.ramp(cfg, 10) == 0.0 and prune.ramp(cfg, 25) == 0.8
    assert prune.ramp(cfg, 15) == pytest.approx(0.8 * (1 - 0.5**3))


def threshold(datasets, ranks: int, *sets: str) -> dict:
    result = run_mpi(ranks, SCRIPT, str(datasets["digits"]), "0.7", *sets, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_global_threshold_at_2_3_4_ranks_and_any_split_equals_one_process(datasets):
    whole = build(ModelConfig(hidden=[48, 40]), (64,), 10, seed=0)  # the layer-seeded build every layout cuts
    parts = [(p, False) for p in whole.parameters() if p.dim() >= 2]
    found, k = prune.global_threshold(parts, 0.7)
    weights = prune.count(parts, None)
    one = {"threshold": float(found).hex(), "k": k, "pruned": k, "weights": weights}
    assert k == round(0.7 * weights) and prune.count(parts, None, lambda t: prune.magnitude(t) <= found) == k
    for ranks, sets in [
        (2, ("parallel.mode='pipeline'", "parallel.stages=2")),
        (2, ("parallel.mode='tensor'", "parallel.tensor=2")),
        (3, ("parallel.mode='zero'", "train.batch_size=48")),
        (4, ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.replicas=2")),
    ]:
        assert threshold(datasets, ranks, *sets) == one, (ranks, sets)


PRUNE_RAMP = ("prune.final_sparsity=0.8", "prune.start=0", "prune.end=8", "prune.every=2")


def train(datasets, run_dir, ranks: int, *sets: str, extra: tuple[str, ...] = (), ramp: tuple[str, ...] = PRUNE_RAMP):
    base = [f"data.path='{datasets['digits']}'", f"run.dir='{run_dir}'", "model.hidden=[32]", "train.batch_size=32",
            "train.max_steps=12", "train.epochs=10", "run.progress=false", *ramp, "run.checkpoint_every=4",
            "run.keep=5"]  # fmt: skip
    return hpcdl_train(ranks, "digits-mlp", *base, *sets, extra=extra, timeout=90)


def zeros(state: dict) -> dict[str, torch.Tensor]:
    return {name: t == 0 for name, t in state.items() if t.dim() >= 2}


def masks_kept(run_dir) -> None:
    """Exactly k weights zero at the end, the very ones pruned at the ramp's end (step 8), 4 steps earlier."""
    figures = read_summary(run_dir)["prune"]
    assert figures["pruned"] == round(0.8 * figures["weights"])  # exactly k: no tie, nothing regrown
    at_end = zeros(checkpoint.load(checkpoint.checkpoint_dir(run_dir) / "step-00000008.pt")["model"])
    final = zeros(torch.load(run_dir / "model.pt", weights_only=True))
    for name, mask in at_end.items():
        assert torch.equal(final[name], mask), name


def test_masked_weights_stay_zero_through_sgd_momentum_steps_on_a_pipeline(datasets, tmp_path):
    sets = ("train.optimizer='sgd'", "train.momentum=0.9", "parallel.mode='pipeline'", "parallel.stages=2")
    result = train(datasets, tmp_path, 2, *sets)
    assert result.returncode == 0, result.stderr
    masks_kept(tmp_path)


def test_masks_kept_through_adam_and_a_resume_mid_ramp_equals_the_uninterrupted_run_bitwise(datasets, tmp_path):
    sets = ("train.optimizer='adam'", "train.lr=0.01")
    assert train(datasets, tmp_path / "whole", 2, *sets).returncode == 0
    masks_kept(tmp_path / "whole")  # through Adam's steps
    stopped = train(datasets, tmp_path / "parts", 2, *sets, extra=("--fault", "signal@1:5"))
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr
    resumed = train(datasets, tmp_path / "parts", 2, *sets, extra=("--resume", "auto"))
    assert resumed.returncode == 0 and "resumed at step 5" in resumed.stdout, resumed.stderr
    whole, parts = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("whole", "parts"))
    assert all(torch.equal(whole[name], parts[name]) for name in whole)
    assert read_summary(tmp_path / "parts")["prune"] == read_summary(tmp_path / "whole")["prune"]


def test_bad_prune_config_is_one_line(datasets, tmp_path):
    assert_one_line(train(datasets, tmp_path, 1, "prune.final_sparsity=1.0"), "prune.final_sparsity")
    assert_one_line(train(datasets, tmp_path, 1, "prune.end=8", "prune.start=9"), "prune.end must be >= prune.start")
    never = train(datasets, tmp_path, 1, "prune.start=12", "prune.end=20")  # max_steps = 12: the ramp never begins
    assert_one_line(never, "prune.start = 12: the run ends at step 12, before the ramp begins")
    assert not tmp_path.joinpath("checkpoints").exists(), "a refused run leaves no run folder behind"


def test_structured_pruning_writes_a_smaller_model_with_the_masked_models_outputs(datasets, tmp_path):
    model = build(ModelConfig(hidden=[24, 16]), (64,), 10, seed=3)
    kept = prune.keep_neurons(model, 0.5, "l1")
    small = prune.prune_neurons(model, kept)
    prune.mask_neurons(model, kept)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)
    assert [m.out_features for m in prune.hidden_linears(small)] == [12, 8, 10]
    # The command: a trained run's model, 50% of its neurons (L2) dropped, then 50% of the rest's weights.
    run, out = tmp_path / "run", tmp_path / "pruned"
    trained = train(datasets, run, 1, "model.hidden=[32, 16]", "run.checkpoint_every=0", ramp=())
    assert trained.returncode == 0, trained.stderr
    command = [sys.executable, "-m", "hpcdl", "prune", str(run), "--structured", "l2", "--fraction", "0.5",
               "--sparsity", "0.5", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    original = build(ModelConfig(hidden=[32, 16]), (64,), 10, seed=0)
    original.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    kept = prune.keep_neurons(original, 0.5, "l2")
    smaller = prune.prune_neurons(original, kept)
    prune.prune_module(smaller, 0.5)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert {name: t.shape for name, t in saved.items()} == {name: t.shape for name, t in smaller.state_dict().items()}
    assert all(torch.equal(saved[name], t) for name, t in smaller.state_dict().items())
    # hpcdl evaluate takes the folder like any run's, at the smaller sizes.
    scored = run_mpi(1, "-m", "hpcdl", "evaluate", "--checkpoint", str(out), "--data", str(datasets["digits"]),
                     "--no-progress", "--out-dir", str(tmp_path / "eval"), timeout=60)  # fmt: skip
    assert scored.returncode == 0, scored.stderr


@pytest.fixture(scope="module")
def pruned(datasets, tmp_path_factory):
    """A short dense run ([32, 16]) and the folder hpcdl prune made of it: half its neurons (L2), then 30% of the
    rest's weights; trained and pruned in this process (one rank: the path every rank count takes)."""
    from hpcdl import comm, config
    from hpcdl.compress.commands import prune_run
    from hpcdl.train import train as train_run

    folder = tmp_path_factory.mktemp("pruned")
    sets = [f"data.path='{datasets['digits']}'", "run.progress=false", "train.max_steps=20", "model.hidden=[32, 16]"]
    train_run(config.load("digits-mlp", [*sets, f"run.dir='{folder / 'dense'}'"]), comm.init(threads=1))
    done = prune_run(str(folder / "dense"), str(folder / "small"), 0.3, "l2", 0.5)
    assert done["hidden"] == [16, 8] and done["pruned"] == done["k"] > 0
    return folder / "small"


def finetune(datasets, small, run_dir, *sets: str, parts=None) -> dict[str, torch.Tensor]:
    """`hpcdl train --config SMALL/config.toml --set train.init=SMALL` for 6 steps, here; its model.pt."""
    from hpcdl import comm, config
    from hpcdl.train import train as train_run

    base = [f"data.path='{datasets['digits']}'", "run.progress=false", f"train.init='{small}'", f"run.dir='{run_dir}'",
            "train.max_steps=6", *sets]  # fmt: skip
    train_run(config.load(str(small / "config.toml"), base), comm.init(threads=1), parts=parts)
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_finetuning_a_structured_model_starts_from_its_pruned_weights_keeps_its_zeros_and_evaluates(
    pruned, datasets, tmp_path
):
    """`train.init` = the folder hpcdl prune wrote: the loop's first step scores the pruned model itself, the zeros
    left by --sparsity stay zero (the folder's [prune] keeps them), and `hpcdl evaluate` takes the result."""
    import h5py
    import torch.nn.functional as F

    from hpcdl.data.partition import Partition
    from hpcdl.train import UserParts

    first_losses: list[float] = []

    class FirstStep:
        def on_step_end(self, record: dict) -> None:
            first_losses.append(record["loss"])

    end = finetune(datasets, pruned, tmp_path / "tuned", "run.log_every=1", parts=UserParts(callbacks=[FirstStep()]))
    # Step 1's loss (taken before its update) is the pruned model's loss on the first global batch.
    start = torch.load(pruned / "model.pt", weights_only=True)
    model = build(ModelConfig(hidden=[16, 8]), (64,), 10, seed=0)
    model.load_state_dict(start)
    with h5py.File(datasets["digits"], "r") as file:
        rows = Partition(len(file["train/y"]), 64, 0, 1, seed=0).epoch(0)[0].local
        x, y = torch.from_numpy(file["train/x"][...][rows]), torch.from_numpy(file["train/y"][...][rows]).long()
    with torch.no_grad():
        assert first_losses[0] == pytest.approx(float(F.cross_entropy(model(x.float()), y)), rel=1e-6)
    assert {name: t.shape for name, t in end.items()} == {name: t.shape for name, t in start.items()}
    assert not all(torch.equal(start[name], end[name]) for name in start)  # it trained
    for name, tensor in start.items():
        if tensor.dim() >= 2:
            assert bool((end[name][tensor == 0] == 0).all()), name  # masks kept through Adam's steps
    scored = run_mpi(2, "-m", "hpcdl", "evaluate", "--checkpoint", str(tmp_path / "tuned"), "--data",
                     str(datasets["digits"]), "--no-progress", "--out-dir", str(tmp_path / "eval"),
                     timeout=60)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"]
    assert evaluated == pytest.approx(read_summary(tmp_path / "tuned")["val_acc"], abs=1e-9)  # the run's own figure


def test_finetuning_on_a_two_stage_pipeline_equals_one_process(pruned, datasets, tmp_path):
    """train.init reaches a split model too: each stage allocates its part from the pruned folder's weights."""
    one = finetune(datasets, pruned, tmp_path / "one")
    sets = [f"data.path='{datasets['digits']}'", "run.progress=false", f"train.init='{pruned}'", "train.max_steps=6",
            f"run.dir='{tmp_path / 'two'}'", "parallel.mode='pipeline'", "parallel.stages=2"]  # fmt: skip
    done = hpcdl_train(2, str(pruned / "config.toml"), *sets, timeout=90)
    assert done.returncode == 0 and "(train.init)" in done.stdout, done.stderr
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-6)


def test_a_train_init_that_is_no_run_is_one_line(tmp_path):
    from hpcdl.errors import HpcdlError
    from hpcdl.preflight import initial_weights

    with pytest.raises(HpcdlError, match=r"^config: train.init = '.*no': neither a checkpoint file nor a run folder$"):
        initial_weights(str(tmp_path / "no"), [])
    with pytest.raises(HpcdlError, match=r"^config: train.init = '.*': no checkpoint in .*checkpoints$"):
        initial_weights(str(tmp_path), [])


def test_prune_out_is_checked_before_loading_and_a_full_folder_moves_aside_only_with_overwrite(pruned, tmp_path):
    from hpcdl.compress.commands import prune_run
    from hpcdl.errors import HpcdlError

    junk, out = tmp_path / "junk.pt", tmp_path / "out"
    junk.write_text("not a checkpoint\n")
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    # A junk checkpoint: each refusal below comes before anything is loaded.
    with pytest.raises(HpcdlError, match=f"^--out {out} is a folder that is not empty; pass --overwrite to move it"):
        prune_run(str(junk), str(out), 0.3, None, 0.5)
    with pytest.raises(HpcdlError, match=f"^--out {junk / 'x'}: {junk} is not a folder"):
        prune_run(str(junk), str(junk / "x"), 0.3, None, 0.5)
    done = prune_run(str(pruned.parent / "dense"), str(out), 0.3, None, 0.5, overwrite=True)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert done["moved_aside"] == str(aside) and (aside / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.toml", "model.pt"]
    assert checkpoint.resolve("latest", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "out", aside.name]  # no partial folder left
