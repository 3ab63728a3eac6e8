"""Interrupted at step k, then resumed, equals the uninterrupted run bitwise."""

from hpcdl import checkpoint

from conftest import hpcdl_train, read_summary


def common(datasets, run_dir):
    return (
        f"data.path='{datasets['synthetic']}'",
        f"run.dir='{run_dir}'",
        "model.hidden=[16]",
        "train.batch_size=32",
        "train.epochs=3",
        "train.optimizer='adam'",
        "run.checkpoint_every=5",
    )


def test_resume_equals_uninterrupted(datasets, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    result = hpcdl_train(2, "digits-mlp", *common(datasets, whole))
    assert result.returncode == 0, result.stderr
    # Stop mid-epoch (540 train samples / 32 = 17 steps per epoch), then continue from the latest checkpoint.
    result = hpcdl_train(2, "digits-mlp", *common(datasets, parts), "train.max_steps=23")
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(checkpoint.resolve("latest", parts))["step_in_epoch"] == 6
    result = hpcdl_train(2, "digits-mlp", *common(datasets, parts), extra=("--resume",))
    assert result.returncode == 0, result.stderr
    assert "resumed at step 23" in result.stdout
    assert read_summary(parts)["param_digests"] == read_summary(whole)["param_digests"]
    assert read_summary(parts)["step"] == read_summary(whole)["step"] == 51
    # Periodic checkpoints every 5 steps, the newest 3 kept.
    kept = [p.name for p in checkpoint.list_checkpoints(whole)]
    assert kept == ["step-00000045.pt", "step-00000050.pt", "step-00000051.pt"]


def test_resume_without_checkpoint_fails_clearly(datasets, tmp_path):
    result = hpcdl_train(2, "digits-mlp", *common(datasets, tmp_path / "empty"), extra=("--resume",), timeout=60)
    assert result.returncode != 0
    assert "no checkpoint in" in result.stderr
