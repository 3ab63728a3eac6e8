"""Knowledge distillation ([distill]: online teacher, precomputed logits) and int8 inference (--quantize int8)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcdl import config, distill
from hpcdl.data.loader import Batch
from hpcdl.data.schema import DatasetInfo
from hpcdl.errors import ConfigError
from hpcdl.parallel.loss import Objective

from conftest import assert_one_line, hpcdl_train, run_mpi

STUDENT = ["model.hidden=[16]", "train.optimizer='sgd'", "train.lr=0.1", "train.max_steps=6", "train.epochs=5"]
SOFT = ["distill.temperature=3.0", "distill.alpha=0.8"]


def test_distillation_loss_equals_plain_torch_reference():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    labels = torch.randint(0, 5, (7,), generator=gen)
    T, alpha = 3.0, 0.3
    p = torch.softmax(teacher / T, dim=1)
    q = torch.softmax(student / T, dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1)  # KL(p || q) per sample
    ce = -torch.log_softmax(student, dim=1)[torch.arange(7), labels]
    reference = (alpha * T * T * kl + (1 - alpha) * ce).mean()
    assert torch.allclose(distill.distillation_loss(student, teacher, labels, T, alpha), reference, atol=1e-6)
    assert torch.allclose(  # torch's own KL (batchmean) agrees
        distill.distillation_loss(student, teacher, labels, T, 1.0),
        F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1), reduction="batchmean") * T * T,
        atol=1e-6,
    )
    # A rank's share is its rows' sum over the global batch: two halves add up to the whole batch's mean.
    cached = np.asarray(teacher.numpy(), dtype=np.float32)

    class Table:
        def logits(self, batch: Batch) -> torch.Tensor:
            return torch.from_numpy(cached[batch.indices])

    objective = distill.DistillObjective(teacher=Table(), temperature=T, alpha=alpha)
    rows = np.arange(7)
    halves = [Batch(torch.zeros(0), labels[part], 7, indices=part) for part in (rows[:3], rows[3:])]
    shares = sum(objective.share_of_loss(student[b.indices], b) for b in halves)
    assert torch.allclose(shares, reference, atol=1e-6)


def test_precomputed_rows_read_by_index_equal_the_cached_file(tmp_path):
    logits = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    path = tmp_path / "logits.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("logits", data=logits)
        file.attrs["split"] = "train"
    indices = np.array([41, 3, 4, 5, 17, 0, 49])
    batch = Batch(torch.zeros(7, 1), torch.zeros(7, dtype=torch.long), 7, indices=indices)
    streamed = distill.PrecomputedLogits(str(path), 50, 4, cache_bytes=0)  # never read whole
    assert streamed.cache is None
    assert np.array_equal(streamed.logits(batch).numpy(), logits[indices])
    assert np.array_equal(distill.PrecomputedLogits(str(path), 50, 4).logits(batch).numpy(), logits[indices])
    with pytest.raises(ConfigError, match=r"shape \(50, 4\), but the train split needs \(60, 4\)"):
        distill.PrecomputedLogits(str(path), 60, 4)


@pytest.mark.parametrize(
    "sets, words",
    [
        (["distill.teacher='t'", "distill.alpha=1.5"], "distill.alpha must be within [0, 1], got 1.5"),
        (["distill.teacher='t'", "distill.alpha=nan"], "distill.alpha must be within [0, 1], got nan"),
        (["distill.teacher='t'", "distill.logits='l.h5'"], "distill.logits is read only with distill.source"),
        (["distill.teacher='t'", "distill.temperature=0"], "distill.temperature must be a finite number > 0"),
        (["distill.source='precomputed'"], "distill.logits must name the teacher's logits file"),
        (["distill.teacher='t'", "parallel.mode='columns'"], "distill.source = 'online' needs the whole samples"),
    ],
)
def test_config_errors(sets, words):
    tree: dict = {"data": {"path": "x.h5"}}
    for assignment in sets:
        (section, key), value = config.parse_override(assignment)
        tree.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as caught:
        config.from_dict(tree)
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("alpha", [0, 0.25, 1])
def test_alpha_takes_both_ends(alpha):
    cfg = config.from_dict({"data": {"path": "x.h5"}, "distill": {"teacher": "t", "alpha": alpha}})
    assert cfg.distill.alpha == alpha and cfg.to_dict()["distill"]["teacher"] == "t"
    assert "distill" not in config.from_dict({"data": {"path": "x.h5"}}).to_dict()  # off: checkpoints as before


@pytest.fixture(scope="module")
def teacher(datasets, tmp_path_factory):
    """A small trained teacher on digits, and its train split's logits written by hpcdl infer."""
    folder = tmp_path_factory.mktemp("teacher")
    run_dir, logits = folder / "run", folder / "logits.h5"
    sets = [f"data.path='{datasets['digits']}'", f"run.dir='{run_dir}'", "train.epochs=4", "run.progress=false"]
    done = hpcdl_train(1, "digits-mlp", *sets, "model.hidden=[64]")
    assert done.returncode == 0, done.stderr
    args = ["-m", "hpcdl", "infer", "--checkpoint", str(run_dir), "--data", str(datasets["digits"]), "--split",
            "train", "--outputs", "logits", "--out", str(logits), "--no-progress", "--threads", "1"]  # fmt: skip
    done = run_mpi(1, *args)
    assert done.returncode == 0, done.stderr
    return run_dir, logits


def _student(ranks, datasets, run_dir, *sets):
    done = hpcdl_train(ranks, "digits-mlp", f"data.path='{datasets['digits']}'", f"run.dir='{run_dir}'",
                       "run.progress=false", *STUDENT, *sets)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "distilling from the " in done.stderr + done.stdout
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_online_and_precomputed_teachers_train_the_same_student_at_one_and_two_ranks(teacher, datasets, tmp_path):
    run_dir, logits = teacher
    online = _student(1, datasets, tmp_path / "online", f"distill.teacher='{run_dir}'", *SOFT)
    precomputed = ["distill.source='precomputed'", f"distill.logits='{logits}'", *SOFT]
    stored = _student(1, datasets, tmp_path / "pre1", *precomputed)
    two = _student(2, datasets, tmp_path / "pre2", *precomputed)
    for name, tensor in online.items():
        assert torch.allclose(tensor, stored[name], atol=1e-6), name
        assert torch.allclose(two[name], stored[name], atol=1e-5), name


@pytest.fixture(scope="module")
def one_rank_student(teacher, datasets, tmp_path_factory):
    """The student distilled online on one rank, trained in this process: what every layout must reproduce."""
    from hpcdl import comm
    from hpcdl.train import train

    run_dir = tmp_path_factory.mktemp("student") / "one"
    sets = [f"data.path='{datasets['digits']}'", f"run.dir='{run_dir}'", "run.progress=false", *STUDENT,
            f"distill.teacher='{teacher[0]}'", *SOFT]  # fmt: skip
    train(config.load("digits-mlp", sets), comm.init(threads=1))
    return torch.load(run_dir / "model.pt", weights_only=True)


@pytest.mark.parametrize(
    "layout, source",
    [
        (["parallel.mode='pipeline'", "parallel.stages=2"], "precomputed"),
        (["parallel.mode='tensor'", "parallel.tensor=2"], "online"),
        (["parallel.mode='columns'"], "precomputed"),
    ],
    ids=["pipeline-precomputed", "tensor-online", "columns-precomputed"],
)
def test_split_models_distill_the_same_student_as_one_rank(layout, source, teacher, one_rank_student, datasets,
                                                           tmp_path):  # fmt: skip
    """Pipeline (the last stage scores, each micro-batch with its sample indices), tensor and columns (each rank
    only its feature columns: precomputed logits) give the one-rank student."""
    run_dir, logits = teacher
    teacher_sets = [f"distill.teacher='{run_dir}'"] if source == "online" else [
        "distill.source='precomputed'", f"distill.logits='{logits}'"]  # fmt: skip
    two = _student(2, datasets, tmp_path / "two", *layout, *teacher_sets, *SOFT)
    for name, tensor in one_rank_student.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-5)


def test_a_missing_teacher_is_one_line(datasets, tmp_path):
    done = hpcdl_train(1, "digits-mlp", f"data.path='{datasets['digits']}'", f"run.dir='{tmp_path / 'run'}'",
                       f"distill.teacher='{tmp_path / 'nowhere'}'")  # fmt: skip
    assert_one_line(done, "distill.teacher")


def test_a_teacher_of_other_classes_is_refused(teacher, datasets):
    info = DatasetInfo("other.h5", 3, (64,), {"train": 10, "val": 2}, {})
    cfg = config.from_dict({"data": {"path": "x.h5"}, "distill": {"teacher": str(teacher[0])}})
    objective = Objective()
    with pytest.raises(ConfigError, match="gives 10 classes, but other.h5 has 3"):
        distill.wrap(cfg, info, objective, [])


def test_int8_inference_is_close_to_fp32_and_a_bad_value_is_one_line(teacher, datasets, tmp_path):
    from hpcdl.infer.inputs import describe_split
    from hpcdl.infer.model import from_checkpoint
    from hpcdl.infer.quantize import int8

    run_dir, _ = teacher
    fp32 = from_checkpoint(str(run_dir), describe_split(str(datasets["digits"]), "val"), [])
    quantized = int8(fp32)
    assert "int8, 2 layers" in quantized.name
    with h5py.File(datasets["digits"], "r") as file:
        x, y = torch.from_numpy(file["val/x"][...]).float(), torch.from_numpy(file["val/y"][...])
    with torch.no_grad():
        accuracy = {name: float((m.module(x).argmax(1) == y).double().mean()) for name, m in
                    (("fp32", fp32), ("int8", quantized))}  # fmt: skip
    assert accuracy["fp32"] > 0.8 and abs(accuracy["int8"] - accuracy["fp32"]) <= 0.02, accuracy
    args = ["-m", "hpcdl", "evaluate", "--checkpoint", str(run_dir), "--data", str(datasets["digits"]),
            "--quantize", "int8", "--out-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    done = run_mpi(2, *args)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["quantize"] == "int8" and metrics["samples_per_s"] > 0 and metrics["ranks"] == 2
    assert abs(metrics["accuracy"] - accuracy["int8"]) <= 0.01
    args = ["-m", "hpcdl", "infer", "--checkpoint", str(run_dir), "--data", str(datasets["digits"]),
            "--out", str(tmp_path / "p.h5"), "--quantize", "int4"]  # fmt: skip
    assert_one_line(run_mpi(1, *args), "--quantize = 'int4' is not one of none, int8")


def test_int8_refuses_a_model_with_nothing_to_quantize():
    from torch import nn

    from hpcdl.infer.model import ScoringModel
    from hpcdl.infer.quantize import int8

    convolutions = ScoringModel(nn.Sequential(nn.Conv1d(1, 3, 2), nn.Flatten()), torch.float32, 3, "convs")
    with pytest.raises(ConfigError, match="--quantize int8: convs has no Linear or LSTM layer to quantize"):
        int8(convolutions)
    doubles = ScoringModel(nn.Linear(4, 3).double(), torch.float64, 3, "mlp")
    with pytest.raises(ConfigError, match="--quantize int8 takes a float32 model; mlp is float64"):
        int8(doubles)
