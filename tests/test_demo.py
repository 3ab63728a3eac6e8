"""The demo's promise: digits MLP under mpirun -n 4 reaches >= 0.90 validation accuracy."""

import re

from conftest import hpcdl_train, read_summary


def test_demo_accuracy(datasets, tmp_path):
    result = hpcdl_train(4, "digits-mlp", f"data.path='{datasets['digits']}'", f"run.dir='{tmp_path}'", timeout=120)
    assert result.returncode == 0, result.stderr
    accuracies = [float(a) for a in re.findall(r"val_acc=(\d\.\d+)", result.stdout)]
    assert len(accuracies) == 15, result.stdout
    assert accuracies[-1] >= 0.90
    assert read_summary(tmp_path)["val_acc"] >= 0.90
    assert (tmp_path / "metrics.jsonl").read_text().count('"event": "epoch"') == 15
