"""hpcdl infer / evaluate / export / hpcdl.predict: one process's answers at any rank count and schedule."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from hpcdl.config import ModelConfig
from hpcdl.data.make import make_synthetic
from hpcdl.data.partition import block_sizes
from hpcdl.export import export, read_safetensors
from hpcdl.models import MLP, build

from conftest import REPO, hpcdl_train, run_mpi

CLASSES, FEATURES = 4, 20
FACTORY = """
from torch import nn


def net(shape, classes, width=12):
    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0], width), nn.ReLU(), nn.Linear(width, classes))
"""


@pytest.fixture(scope="module")
def scoring_data(tmp_path_factory):
    """77 val rows (not divisible by 2, 3 or 4), and `features`: the same rows without labels."""
    path = tmp_path_factory.mktemp("infer-data") / "scoring.h5"
    make_synthetic(path, n=770, features=FEATURES, classes=CLASSES, progress=False)
    with h5py.File(path, "a") as file:
        file["features/x"] = file["val/x"][:]
    return path


def val_split(path):
    with h5py.File(path, "r") as file:
        return torch.from_numpy(file["val/x"][:]), file["val/y"][:]


def reference_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """One process, the whole split in one batch."""
    with torch.no_grad():
        return model.eval()(x).numpy()


def numpy_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Loss, accuracy, per-class precision/recall/F1 and confusion, from the definitions."""
    values = logits.astype(np.float64)
    top = values.max(axis=1, keepdims=True)
    log_probs = values - top - np.log(np.exp(values - top).sum(axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    hits = np.diag(confusion)
    precision = np.array([hits[k] / confusion[:, k].sum() if confusion[:, k].sum() else 0.0 for k in range(CLASSES)])
    recall = np.array([hits[k] / confusion[k].sum() if confusion[k].sum() else 0.0 for k in range(CLASSES)])
    f1 = np.array([2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)])
    return {
        "loss": -log_probs[np.arange(len(labels)), labels].mean(),
        "accuracy": (predicted == labels).mean(),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "confusion": confusion,
    }


def assert_metrics(got: dict, logits: np.ndarray, labels: np.ndarray) -> None:
    expected = numpy_metrics(logits, labels)
    np.testing.assert_array_equal(np.array(got["confusion"]), expected["confusion"])
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for name in ("precision", "recall", "f1"):
        np.testing.assert_allclose(np.array(got[name]), expected[name], rtol=1e-12, atol=1e-12)


def assert_predictions(path, logits: np.ndarray) -> None:
    """The file's rows in input order: index, class exactly, logits and probs within float tolerance."""
    with h5py.File(path, "r") as file:
        np.testing.assert_array_equal(file["index"][:], np.arange(len(logits)))
        np.testing.assert_array_equal(file["class"][:], logits.argmax(axis=1))
        np.testing.assert_allclose(file["logits"][:], logits, rtol=1e-5, atol=1e-6)
        if "probs" in file:
            np.testing.assert_allclose(file["probs"][:], torch.softmax(torch.from_numpy(logits), 1), atol=1e-6)


def stored_metrics(path) -> dict:
    """The metrics group of an output file, as a dict."""
    with h5py.File(path, "r") as file:
        group = file["metrics"]
        return {**dict(group.attrs), **{name: group[name][:] for name in group}}


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_predictions_equal_one_process_at_any_rank_count_and_schedule(ranks, scoring_data, tmp_path):
    result = run_mpi(ranks, str(REPO / "tests/scripts/infer_check.py"), str(scoring_data), str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    x, labels = val_split(scoring_data)
    torch.manual_seed(0)
    logits = reference_logits(MLP(FEATURES, [16], CLASSES), x)
    for schedule in ("static", "dynamic"):
        assert_predictions(tmp_path / f"{schedule}.h5", logits)
        assert_metrics(stored_metrics(tmp_path / f"{schedule}.h5"), logits, labels)
        assert_metrics(report[schedule]["metrics"], logits, labels)
        assert sum(report[schedule]["rows_per_rank"]) == len(labels)
        unlabelled = np.load(tmp_path / f"features-{schedule}.npz")
        np.testing.assert_array_equal(unlabelled["index"], np.arange(len(labels)))
        np.testing.assert_array_equal(unlabelled["class"], logits.argmax(axis=1))
        np.testing.assert_allclose(unlabelled["logits"], logits, rtol=1e-5, atol=1e-6)
        assert report[f"features-{schedule}"]["metrics"] is None
    assert report["static"]["rows_per_rank"] == block_sizes(len(labels), ranks).tolist()
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def model_parallel_runs(scoring_data, tmp_path_factory):
    """A pipeline run of a factory's model (module next to its config) and a tensor-parallel MLP run."""
    folder = tmp_path_factory.mktemp("infer-runs")
    (folder / "infer_factory_net.py").write_text(FACTORY)
    toml = folder / "factory.toml"
    toml.write_text(f'[data]\npath = "{scoring_data}"\n[model]\nfactory = "infer_factory_net:net"\n')
    common = ["train.max_steps=2", "train.batch_size=32", "run.watchdog_s=0", "run.progress=false"]
    runs = {
        "pipeline": (str(toml), ["parallel.mode='pipeline'", "parallel.stages=2"]),
        "tensor": (
            "synthetic-mlp",
            [f"data.path='{scoring_data}'", "model.hidden=[16, 16]", "parallel.mode='tensor'", "parallel.tensor=2"],
        ),
    }
    for name, (config, sets) in runs.items():
        result = hpcdl_train(2, config, *sets, *common, f"run.dir='{folder / name}'")
        assert result.returncode == 0, result.stderr
    return folder


def plain_model(run_dir, name: str) -> torch.nn.Module:
    """The unsplit model a run trained, as plain PyTorch builds it, with the run's final weights (model.pt)."""
    if name == "pipeline":
        sys.path.insert(0, str(run_dir.parent))
        try:
            from infer_factory_net import net
        finally:
            sys.path.remove(str(run_dir.parent))
        model = net((FEATURES,), CLASSES)
    else:
        model = build(ModelConfig(name="mlp", hidden=[16, 16]), (FEATURES,), CLASSES, seed=0)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    return model


def test_pipeline_and_tensor_checkpoints_score_as_the_model_they_came_from(model_parallel_runs, scoring_data, tmp_path):
    x, labels = val_split(scoring_data)
    pipeline, tensor = model_parallel_runs / "pipeline", model_parallel_runs / "tensor"
    out = tmp_path / "pipeline.h5"
    result = run_mpi(
        2, "-m", "hpcdl", "infer", "--checkpoint", str(pipeline), "--data", str(scoring_data), "--split", "val",
        "--out", str(out), "--outputs", "logits,probs", "--schedule", "dynamic", "--batch", "8", "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    logits = reference_logits(plain_model(pipeline, "pipeline"), x)
    assert_predictions(out, logits)
    assert_metrics(stored_metrics(out), logits, labels)

    report = tmp_path / "report"
    result = run_mpi(
        2, "-m", "hpcdl", "evaluate", "--checkpoint", str(tensor), "--data", str(scoring_data), "--split", "val",
        "--out-dir", str(report), "--batch", "16", "--threads", "1", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    logits = reference_logits(plain_model(tensor, "tensor"), x)
    metrics = json.loads((report / "metrics.json").read_text())
    assert_metrics(metrics, logits, labels)
    assert metrics["split"] == "val" and metrics["samples"] == len(labels)
    rows = (report / "confusion.csv").read_text().splitlines()
    np.testing.assert_array_equal(np.array([r.split(",")[1:] for r in rows[1:]], dtype=int), metrics["confusion"])
    assert (report / "confusion.png").read_bytes().startswith(b"\x89PNG")
    assert f"accuracy {metrics['accuracy']:.4f}" in result.stdout


def test_export_round_trips_into_the_plain_model(model_parallel_runs, tmp_path):
    tensor = model_parallel_runs / "tensor"
    result = subprocess.run(
        [sys.executable, "-m", "hpcdl", "export", str(tensor), "--out", str(tmp_path / "model.safetensors")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    export(str(tensor), tmp_path / "model.pt")
    expected = torch.load(tensor / "model.pt", weights_only=True)
    weights, metadata = read_safetensors(tmp_path / "model.safetensors")
    assert json.loads(metadata["config"])["parallel"]["mode"] == "tensor"
    for exported in (weights, torch.load(tmp_path / "model.pt", weights_only=True)):
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected)
        model = build(ModelConfig(name="mlp", hidden=[16, 16]), (FEATURES,), CLASSES, seed=1)
        model.load_state_dict(exported)
    header_length = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_bad_inputs_end_every_rank_with_one_line_and_leave_no_output(model_parallel_runs, scoring_data, tmp_path):
    run_dir = model_parallel_runs / "tensor"
    existing = tmp_path / "existing.h5"
    existing.write_bytes(b"an earlier result, kept")
    regular_file, junk, empty_run = tmp_path / "a-file", tmp_path / "junk.pt", tmp_path / "empty-run"
    regular_file.write_text("x")
    junk.write_bytes(b"not a checkpoint")
    empty_run.mkdir()
    narrow, three = tmp_path / "narrow.h5", tmp_path / "three-classes.h5"
    make_synthetic(narrow, n=40, features=12, classes=CLASSES, progress=False)
    make_synthetic(three, n=40, features=FEATURES, classes=3, progress=False)

    def infer(*args: str, data=scoring_data, checkpoint=run_dir, out=tmp_path / "new.h5") -> list[str]:
        return ["infer", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), *args]

    cases = {
        "existing.h5 already exists; pass --overwrite": infer(out=existing),
        "samples of shape (12,)": infer(data=narrow),
        "gives 4 classes, but": infer(data=three),
        "no split 'test'": infer("--split", "test"),
        "junk.pt is not an hpcdl checkpoint": infer(checkpoint=junk),
        "no checkpoint in": infer(checkpoint=empty_run),
        "is not a folder": infer(out=regular_file / "x.h5"),
        "does not exist": infer(out=tmp_path / "missing" / "x.h5"),
        "is a folder": infer(out=tmp_path),
        "'foo' is not one of class, probs, logits": infer("--outputs", "class,foo"),
        "'round-robin' is not one of static, dynamic": infer("--schedule", "round-robin"),
        "--batch must be a positive integer": infer("--batch", "0"),
        "no labels": ["evaluate", "--checkpoint", str(run_dir), "--data", str(scoring_data), "--split", "features"],
        "nowhere.h5: does not exist": infer(data=tmp_path / "nowhere.h5"),
    }
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[*argv, "--no-progress"] for argv in cases.values()]))
    result = run_mpi(2, str(REPO / "tests/scripts/infer_bad_inputs.py"), str(spec), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # Ranks' stdout reaches us through the launcher, which may splice two ranks' lines together: find, not split.
    statuses = [list(found) for found in re.findall(r"@@exit (\d+) (\d+) (\w+)", result.stdout)]
    assert sorted(statuses) == sorted([str(k), str(r), "2"] for k in range(len(cases)) for r in range(2))
    said = result.stderr.split("@@case ")[1:]
    for words, text in zip(cases, said):
        errors = [line for line in text.splitlines()[1:] if line.startswith("hpcdl: error")]
        assert len(errors) == 1 and words in errors[0], (words, text)
    assert existing.read_bytes() == b"an earlier result, kept" and not (tmp_path / "new.h5").exists()
    assert leftovers(tmp_path) == [] and not (tmp_path / "missing").exists()
    assert not (run_dir / "eval-features").exists()

    # The same through a whole job of its own: every rank exits with status 2.
    result = run_mpi(2, "-m", "hpcdl", *infer(data=narrow), "--threads", "1", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("hpcdl: error")] == [
        line for line in result.stderr.splitlines() if "samples of shape (12,)" in line
    ]


def test_bench_infer_reports_both_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = run_mpi(
        1, "-m", "hpcdl", "bench", "infer", "--n", "2000", "--features", "8", "--hidden", "8", "--classes", "3",
        "--batch", "128", "--repeats", "1", "--json", str(out), timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["dynamic_vs_static_slowed"] > 0 and figures["dynamic_vs_static_equal"] > 0
    assert figures["torch_samples_per_s"] > 0 and figures["hpcdl_2_dynamic_slowed_samples_per_s"] > 0
    assert sum(figures["dynamic_slowed_rows_per_rank"]) == figures["rows"]


def test_a_claim_does_not_wait_for_a_busy_rank_0():
    """MPICH may progress passive-target RMA only inside MPI calls on the target: the counter must not need that."""
    result = run_mpi(2, str(REPO / "tests/scripts/counter_progress.py"), timeout=60)
    assert result.returncode == 0, result.stderr
    # Each rank prints one JSON object; the launcher may splice their lines.
    said = {k: v for text in re.findall(r"\{[^}]*\}", result.stdout) for k, v in json.loads(text).items()}
    assert said["claims_done"] < said["busy_until"], said
