"""hpcdl as a library: the examples run under mpirun and give the command line's (and one process's) parameters."""

import subprocess
import sys

import pytest

from hpcdl import checkpoint
from hpcdl.api import fit_config
from hpcdl.config import ModelConfig
from hpcdl.errors import ConfigError

from conftest import REPO, hpcdl_train, read_summary, run_mpi
from reference import assert_close_states, plain_mlp, reference_train

EXAMPLES = REPO / "examples"
STEPS, LR = 12, 0.05
OWN_MODEL = plain_mlp([64, 32])  # what examples/my_model.py:mlp builds in own_model.toml


def latest_model(run_dir) -> dict:
    return checkpoint.load(checkpoint.resolve("latest", run_dir))["model"]


def test_import_starts_nothing():
    """`import hpcdl` (and hpcdl.data) neither initialises MPI nor loads torch: `hpcdl data ...` stays light."""
    code = (
        "import sys, hpcdl, hpcdl.data; hpcdl.data.RankLoader; print('mpi4py' in sys.modules, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_own_loop_matches_the_command_line(datasets, tmp_path):
    """examples/own_loop.py (DataParallel, no_sync, hpcdl.data.open) == `hpcdl train` on the same TOML == one process.

    With 2 batches accumulated per step, that is one process with twice the batch and half the steps.
    """
    sets = [
        f"data.path='{datasets['digits']}'",
        f"train.max_steps={STEPS}",
        "parallel.accumulate_steps=2",
        "run.progress=false",
    ]
    cli = hpcdl_train(2, str(EXAMPLES / "own_model.toml"), *sets, f"run.dir='{tmp_path / 'cli'}'", timeout=300)
    assert cli.returncode == 0, cli.stderr
    args = [str(EXAMPLES / "own_loop.py"), "--config", str(EXAMPLES / "own_model.toml")]
    for assignment in [*sets, f"run.dir='{tmp_path / 'own'}'"]:
        args += ["--set", assignment]
    own = run_mpi(2, *args, timeout=300)
    assert own.returncode == 0, own.stderr
    assert "val_acc" in own.stdout and "ms per step" in own.stdout, own.stdout
    expected = reference_train(datasets["digits"], OWN_MODEL, seed=0, batch=128, steps=STEPS // 2, lr=LR)
    assert_close_states(latest_model(tmp_path / "cli"), expected)
    assert_close_states(latest_model(tmp_path / "own"), latest_model(tmp_path / "cli"))


def test_fit_runs_the_command_lines_loop(datasets, tmp_path):
    """examples/fit_model.py: hpcdl.fit on your own model == one process, with the CLI's summary and checkpoints."""
    result = run_mpi(
        2, str(EXAMPLES / "fit_model.py"), str(datasets["digits"]), f"run_dir={tmp_path}", f"max_steps={STEPS}"
    )
    assert result.returncode == 0, result.stderr
    assert "fit: val_acc" in result.stdout, result.stdout
    expected = reference_train(datasets["digits"], OWN_MODEL, seed=0, batch=64, steps=STEPS, lr=LR)
    assert_close_states(latest_model(tmp_path), expected)
    summary = read_summary(tmp_path)
    assert summary["steps"] == STEPS and len(set(summary["param_digests"])) == 1


def test_pipeline_example_matches_one_process(datasets, tmp_path):
    """examples/own_pipeline.py: a user's nn.Sequential over 2 stages == the unsplit model in one process."""
    result = run_mpi(
        2,
        str(EXAMPLES / "own_pipeline.py"),
        "--data",
        str(datasets["digits"]),
        "--max-steps",
        str(STEPS),
        "--run-dir",
        str(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 stages" in result.stdout, result.stdout
    # Built on the meta device, the stages are initialised layer by layer as hpcdl builds its own mlp.
    layerwise = ModelConfig(name="mlp", hidden=[64, 32])
    expected = reference_train(datasets["digits"], layerwise, seed=0, batch=64, steps=STEPS, lr=LR)
    assert_close_states(latest_model(tmp_path), expected)


def test_data_open_with_a_bad_file_ends_every_rank(tmp_path):
    missing = tmp_path / "missing.h5"
    code = f"import hpcdl; hpcdl.data.open({str(missing)!r}, 'train', 32); print('not reached')"
    result = run_mpi(2, "-c", code, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "file does not exist" in result.stderr and "not reached" not in result.stdout, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_fit_options_are_config_keys():
    cfg = fit_config("x.h5", epochs=3, run_dir="runs/r", train_seed=7, compression="fp16")
    assert (cfg.train.epochs, cfg.run.dir, cfg.train.seed, cfg.parallel.compression) == (3, "runs/r", 7, "fp16")
    assert cfg.data.path == "x.h5"
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        fit_config("x.h5", epoch=3)
    with pytest.raises(ConfigError, match="train.lr"):
        fit_config("x.h5", lr=-1.0)
