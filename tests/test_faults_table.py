"""Runs every row of faults_table.CASES under mpiexec (the expected message, status and promptness), and every
bad config value against config.load."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from faults_table import CASES, CONFIG_VALUES, Case, config_settings

from hpcdl import checkpoint, config, rundir
from hpcdl.config import ModelConfig
from hpcdl.errors import HpcdlError
from hpcdl.models import build

from conftest import REPO, run_watched

FEATURES, CLASSES = 20, 4  # the `synthetic` test dataset


def saved_run(run_dir: Path, hidden: list[int], config: dict | None = None) -> list[Path]:
    """Two checkpoints as training writes them, of an MLP with `hidden` layers (trained with `config`)."""
    model = build(ModelConfig(name="mlp", hidden=hidden), (FEATURES,), CLASSES, 0)
    optimizer = torch.optim.Adam(model.parameters())
    for step in (2, 4):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
        state.update(step_in_epoch=step, global_step=step, world_size=2, config=config or {}, source="test")
        checkpoint.save(run_dir, step, state)
    return checkpoint.list_checkpoints(run_dir)


def all_corrupt(run_dir: Path, data: Path) -> Path:
    for path in saved_run(run_dir, [16]):
        os.truncate(path, path.stat().st_size - 7)
    return data


def other_model(run_dir: Path, data: Path) -> Path:
    saved_run(run_dir, [8])
    return data


def bad_manifest(run_dir: Path, data: Path) -> Path:
    saved_run(run_dir, [16])
    (checkpoint.checkpoint_dir(run_dir) / checkpoint.MANIFEST).write_text("{ not json")
    return data


def corrupt_chunk(run_dir: Path, data: Path) -> Path:
    """A copy of the data with fletcher32 checksums and one flipped byte in /train/x's first chunk."""
    broken = run_dir.parent / "broken.h5"
    with h5py.File(data, "r") as src, h5py.File(broken, "w") as dst:
        dst.attrs.update(src.attrs)
        for split in ("train", "val"):
            dst.create_dataset(f"{split}/x", data=src[f"{split}/x"][:], chunks=(30, FEATURES), fletcher32=True)
            dst[f"{split}/y"] = src[f"{split}/y"][:]
        offset = dst["train/x"].id.get_chunk_info(0).byte_offset
    with broken.open("r+b") as file:
        file.seek(offset + 100)
        byte = file.read(1)
        file.seek(offset + 100)
        file.write(bytes([byte[0] ^ 0xFF]))
    return broken


def write_h5(path: Path, n_train=200, n_val=40, classes=CLASSES, edit=None, **arrays) -> Path:
    """A small valid file of the schema, optionally broken by `edit(file)` before it is closed."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update(num_classes=classes, feature_shape=np.array([FEATURES]), generator="test", seed=0)
        for split, n in (("train", n_train), ("val", n_val)):
            f[f"{split}/x"] = arrays.get(f"{split}_x", rng.random((n, FEATURES)).astype("float32"))
            f[f"{split}/y"] = arrays.get(f"{split}_y", rng.integers(0, classes, n).astype("int64"))
        if edit:
            edit(f)
    return path


def data_setup(edit=None, **options):
    """A setup that writes a small data file (broken by `edit`) next to the run folder."""

    def setup(run_dir: Path, data: Path) -> Path:
        return write_h5(run_dir.parent / "data.h5", edit=edit, **options)

    return setup


def _put(split: str, row: int, value: float):
    def edit(f):
        f[f"{split}/x"][row, 3] = value

    return edit


def _replace(name: str, values) -> callable:
    def edit(f):
        del f[name]
        f[name] = values

    return edit


def _delete(name: str):
    def edit(f):
        del f[name]

    return edit


def external_link(run_dir: Path, data: Path) -> Path:
    path = write_h5(run_dir.parent / "linked.h5", edit=_delete("val/x"))
    with h5py.File(path, "a") as f:
        f["val/x"] = h5py.ExternalLink("gone.h5", "/val/x")
    return path


def previous_run(run_dir: Path, data: Path) -> Path:
    """Checkpoints of a run with the table's own settings (command()), so a resume compares configs."""
    sets = [a for a in command(Case("", (), ""), data, run_dir) if "=" in a and not a.startswith("-")]
    saved_run(run_dir, [16], config.load("digits-mlp", sets).to_dict())
    return data


# The job's end is timed from the first of these on stderr: the injected fault, or the first error line.
MARKERS = ("hpcdl: fault: injecting", "hpcdl: error")
LOCKS: list[rundir.RunLock] = []  # held by this test process (a live run) until the test ends


def locked(run_dir: Path, data: Path) -> Path:
    run_dir.mkdir(parents=True)
    lock = rundir.RunLock(run_dir)
    lock.acquire()
    LOCKS.append(lock)
    return data


def checkpoints_file(run_dir: Path, data: Path) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").write_text("not a folder")
    return data


def run_dir_file(run_dir: Path, data: Path) -> Path:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.write_text("not a folder")
    return data


def file_in_the_way(run_dir: Path, data: Path) -> Path:
    """A file where run.dir's path needs a folder (the row's run.dir is {tmp}/data.h5/run)."""
    _text(run_dir.parent / "data.h5", "a file, not a folder\n")
    return data


def random_bytes_checkpoint(run_dir: Path, data: Path) -> Path:
    saved_run(run_dir, [16])
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    newest.write_bytes(os.urandom(newest.stat().st_size))
    return data


def module_files(setting: str, body: str):
    """A setup writing `fmod.py` (its function `make`) and `conf.toml` naming it as `setting` ("section.key")."""
    section, key = setting.split(".")

    def setup(run_dir: Path, data: Path) -> Path:
        folder = run_dir.parent
        header = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n\n"
        (folder / "fmod.py").write_text(header + body)
        (folder / "conf.toml").write_text(f'[{section}]\n{key} = "fmod:make"\n')
        return data

    return setup


def fit_script(part: str):
    """A setup writing `fit.py`: hpcdl.fit of a small model on the data into run_dir, with `part` (an argument)."""

    def setup(run_dir: Path, data: Path) -> Path:
        (run_dir.parent / "fit.py").write_text(
            "import torch\nfrom torch import nn\n\nimport hpcdl\n\n"
            "hpcdl.init(threads=1)\n"
            f"hpcdl.fit(nn.Linear({FEATURES}, {CLASSES}), {str(data)!r}, run_dir={str(run_dir)!r}, max_steps=2, "
            f"progress=False, {part})\n"
        )
        return data

    return setup


def config_file(text: str | bytes):
    """A setup writing `conf.toml` with `text` (or bytes) in the test's folder."""

    def setup(run_dir: Path, data: Path) -> Path:
        path = run_dir.parent / "conf.toml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return data

    return setup


SETUPS = {
    "all corrupt": all_corrupt,
    "other model": other_model,
    "bad manifest": bad_manifest,
    "corrupt chunk": corrupt_chunk,
    "previous run": previous_run,
    "locked": locked,
    "checkpoints file": checkpoints_file,
    "run dir file": run_dir_file,
    "random checkpoint": random_bytes_checkpoint,
    "external link": external_link,
    "not hdf5": lambda run_dir, data: _text(run_dir.parent / "data.h5", "not an HDF5 file\n"),
    "empty file": lambda run_dir, data: _text(run_dir.parent / "data.h5", ""),
    "nan train": data_setup(edit=_put("train", 17, np.nan)),
    "inf train": data_setup(edit=_put("train", 5, np.inf)),
    "nan val": data_setup(edit=_put("val", 7, np.nan)),
    "label out of range": data_setup(train_y=np.full(200, 9, dtype="int64")),
    "negative label": data_setup(train_y=np.full(200, -1, dtype="int64")),
    "float labels": data_setup(train_y=np.zeros(200, dtype="float32")),
    "int features": data_setup(train_x=np.zeros((200, FEATURES), dtype="int32")),
    "float64 features": data_setup(train_x=np.zeros((200, FEATURES), dtype="float64")),
    "length mismatch": data_setup(train_y=np.zeros(150, dtype="int64")),
    "missing val": data_setup(edit=_delete("val")),
    "missing train x": data_setup(edit=_delete("train/x")),
    "no num_classes": data_setup(edit=lambda f: f.attrs.__delitem__("num_classes")),
    "too few samples": data_setup(n_train=20),
    "few labels": data_setup(train_y=np.zeros(200, dtype="int64")),
    "factory raises": module_files(
        "model.factory", "def make(shape, classes):\n    raise RuntimeError('out of ideas')\n"
    ),
    "factory not a module": module_files("model.factory", "def make(shape, classes):\n    return 42\n"),
    "factory wrong outputs": module_files(
        "model.factory",
        "def make(shape, classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0], classes + 3))\n",
    ),
    "factory wrong inputs": module_files(
        "model.factory",
        "def make(shape, classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0] + 5, classes))\n",
    ),
    "factory missing": config_file('[model]\nfactory = "nosuchmodule:make"\n'),
    "loss per sample": module_files(
        "train.loss", "def make(outputs, targets):\n    return F.cross_entropy(outputs, targets, reduction='none')\n"
    ),
    "fit optimizer": fit_script("optimizer=lambda params: 5"),
    "fit scheduler": fit_script("scheduler=lambda optimizer: 5"),
    "file in run.dir's path": file_in_the_way,
    "bad toml": config_file("[train\nlr = 0.1\n"),
    "binary config": config_file(bytes(range(128, 256))),
    "unknown section": config_file("[optimiser]\nlr = 0.1\n"),
}


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def fingerprint(*paths: Path) -> dict[str, str]:
    """Every file at or under `paths` with a digest of its bytes: equal fingerprints, nothing touched."""
    files = [p for path in paths if path.exists() for p in ([path] if path.is_file() else path.rglob("*"))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def command(case: Case, data: Path, run_dir: Path) -> list[str]:
    """`hpcdl train` with the table's options on a small config: 2 epochs of 17 steps ("{tmp}": the test's folder)."""
    options = [a.replace("{tmp}", str(run_dir.parent)) for a in case.args]
    if case.script:  # a "{tmp}/..." script is an absolute path, which the join below keeps as it is
        return [str(REPO / "tests" / "scripts" / case.script.replace("{tmp}", str(run_dir.parent))), *options]
    args = ["-m", "hpcdl", "train", "--config", "digits-mlp", "--threads", "1"]
    # A row that brings its own model (a config file's factory, another model.name) gets no MLP size: it would be
    # refused as a key nothing reads.
    own_model = any(item == "--config" or item.startswith("model.name=") for item in options)
    sets = [f"data.path='{data}'", f"run.dir='{run_dir}'", *([] if own_model else ["model.hidden=[16]"])]
    sets += ["train.batch_size=32"]
    sets += ["train.epochs=2", "run.progress=false"]
    while options:
        item = options.pop(0)
        if item.startswith("--"):
            args += [item, options.pop(0)]
        else:
            sets.append(item)
    for assignment in sets:
        args += ["--set", assignment]
    return args


def test_table_covers_every_fault_kind():
    from hpcdl.faults import KINDS

    tried = {arg.split("@")[0] for case in CASES for arg in case.args if "@" in arg}
    assert set(KINDS) - {"stall"} <= tried  # stall only gives time for a signal (test_reliability)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fault(case: Case, datasets, tmp_path):
    run_dir = tmp_path / "run"
    data = datasets["synthetic"]
    if case.setup:
        data = SETUPS[case.setup](run_dir, data)
    before, existed = fingerprint(run_dir, data), run_dir.exists()
    try:
        status, stdout, stderr, seconds = run_watched(case.ranks, command(case, data, run_dir), MARKERS)
    finally:
        while LOCKS:
            LOCKS.pop().release()
    if case.status is None:
        assert status != 0, f"expected a failure, got success:\n{stdout}"
    else:
        assert status == case.status, f"status {status}, expected {case.status}:\n{stdout}\n{stderr}"
    message = case.message.replace("{tmp}", str(tmp_path))
    assert message in stdout + stderr, f"expected {message!r} in:\n{stdout}\n{stderr}"
    assert stderr.count("Traceback") == case.tracebacks, stderr
    if status != 0:  # every rank gone promptly once the cause is known
        assert seconds is not None and seconds < case.within_s, f"ended {seconds} s after the fault or error line"
    if case.clean:
        errors = [line for line in stderr.splitlines() if line.startswith("hpcdl: error")]
        assert len(errors) == (1 if status else 0), stderr
        assert not (run_dir / "metrics.jsonl").exists() or status == 0, "a run that failed to start wrote a log"
        if not existed and status:
            assert not run_dir.exists(), "a run that failed to start must leave no run folder"
        if status:
            assert fingerprint(run_dir, data) == before, "existing files must be left untouched"


@pytest.mark.parametrize(("name", "setting", "message"), CONFIG_VALUES, ids=[row[0] for row in CONFIG_VALUES])
def test_config_value(name: str, setting: str, message: str):
    with pytest.raises(HpcdlError) as refused:
        config.load("digits-mlp", list(config_settings(name, setting)))
    text = str(refused.value)
    assert message in text and "\n" not in text, text
