"""What a command reads and writes (issue 33): no existing output replaced without --overwrite and every output path
checked before the model loads, export only in the formats it writes, --resume taking a run folder, a damaged
manifest or a file that is no checkpoint said in one line, and a dead run's partial file never holding the folder.

Everything runs in this process (`hpcdl.cli.main`, one rank): no check here depends on the rank count.
"""

from __future__ import annotations

import json
import shutil

import h5py
import pytest
import torch

from hpcdl import checkpoint, rundir
from hpcdl.cli import main
from hpcdl.data.make import make_synthetic
from hpcdl.errors import HpcdlError
from hpcdl.preflight import initial_weights

QUIET = ["run.progress=false", "run.watchdog_s=0", "train.batch_size=32"]


def hpcdl(*argv) -> int:
    """`hpcdl ARGV` in this process: its exit status (a failure agreed by every rank exits through SystemExit)."""
    try:
        return main([str(arg) for arg in argv])
    except SystemExit as exc:
        return exc.code


def refused(capsys, *argv) -> str:
    """`hpcdl ARGV` ends with status 2 and one line on stderr, no traceback: that line."""
    status = hpcdl(*argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("hpcdl: error: "), err
    return lines[0]


def train(config: str, run_dir, *sets: str, resume: str = "") -> int:
    argv = ["train", "--config", config, "--threads", "1", *(["--resume", resume] if resume else [])]
    return hpcdl(*argv, *(arg for s in [*QUIET, f"run.dir='{run_dir}'", *sets] for arg in ("--set", s)))


@pytest.fixture(scope="module")
def runs(datasets, tmp_path_factory):
    """Two short runs trained here: an MLP on the 20-feature set, a CNN on the (1, 8, 8) images; and junk.pt."""
    folder = tmp_path_factory.mktemp("outputs")
    mlp = ("synthetic-mlp", f"data.path='{datasets['synthetic']}'", "model.hidden=[8]", "train.max_steps=2")
    cnn = ("images-cnn", f"data.path='{datasets['images']}'", "model.channels=[4]", "model.fc=8", "train.max_steps=1")
    for name, (config, *sets) in {"mlp": mlp, "cnn": cnn}.items():
        assert train(config, folder / name, *sets) == 0
    (folder / "junk.pt").write_text("not a checkpoint\n")
    return folder


def test_export_writes_only_its_formats_and_replaces_a_file_only_with_overwrite(runs, tmp_path, capsys):
    junk = runs / "junk.pt"  # every refusal below comes before loading: this one would say it is no checkpoint
    said = refused(capsys, "export", junk, "--out", tmp_path / "model.onnx")
    assert "not .onnx" in said and ".safetensors" in said and ".pt / .pth" in said
    assert "no suffix" in refused(capsys, "export", junk, "--out", tmp_path / "model")
    assert "does not exist" in refused(capsys, "export", junk, "--out", tmp_path / "missing" / "model.pt")
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"an earlier export, kept")
    said = refused(capsys, "export", runs / "mlp", "--out", existing)
    assert f"--out {existing} already exists; pass --overwrite" in said
    assert existing.read_bytes() == b"an earlier export, kept" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.pt"
    ]

    assert hpcdl("export", runs / "mlp", "--out", existing, "--overwrite") == 0
    saved = checkpoint.load(checkpoint.resolve("latest", runs / "mlp"))["model"]
    exported = torch.load(existing, weights_only=True)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_infer_and_evaluate_refuse_an_existing_output_before_loading_and_replace_it_with_overwrite(
    runs, datasets, tmp_path, capsys
):
    data, junk, mlp = datasets["synthetic"], runs / "junk.pt", runs / "mlp"
    existing = tmp_path / "preds.h5"
    existing.write_bytes(b"earlier predictions, kept")
    scoring = ("--data", data, "--no-progress", "--threads", "1")
    infer = ("infer", "--checkpoint", junk, *scoring, "--out")
    assert "already exists; pass --overwrite" in refused(capsys, *infer, existing)
    assert "is not a folder" in refused(capsys, *infer, existing / "x.h5")
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("{}")
    said = refused(capsys, "evaluate", "--checkpoint", junk, *scoring, "--out-dir", report)
    assert "already holds an evaluation report (metrics.json); pass --overwrite" in said
    assert "is not a folder" in refused(capsys, "evaluate", "--checkpoint", junk, *scoring, "--out-dir", existing / "r")
    assert existing.read_bytes() == b"earlier predictions, kept" and (report / "metrics.json").read_text() == "{}"

    assert hpcdl("infer", "--checkpoint", mlp, *scoring, "--out", existing, "--overwrite") == 0
    with h5py.File(existing, "r") as file:
        assert len(file["index"]) == len(file["class"]) > 0
    # The default report folder, eval-SPLIT in the run folder: a second evaluation replaces it only when asked.
    assert hpcdl("evaluate", "--checkpoint", mlp, *scoring) == 0
    first = (mlp / "eval-val" / "metrics.json").read_text()
    assert "already holds an evaluation report" in refused(capsys, "evaluate", "--checkpoint", mlp, *scoring)
    assert (mlp / "eval-val" / "metrics.json").read_text() == first
    assert hpcdl("evaluate", "--checkpoint", mlp, *scoring, "--overwrite") == 0
    assert json.loads((mlp / "eval-val" / "metrics.json").read_text())["split"] == "val"
    assert not [p for p in (*tmp_path.iterdir(), *(mlp / "eval-val").iterdir()) if p.name.endswith(".partial")]


def test_a_cnn_checkpoint_on_flat_samples_names_its_model_and_both_shapes(runs, tmp_path, capsys):
    flat = tmp_path / "flat.h5"
    make_synthetic(flat, n=40, features=8, classes=3, progress=False)
    said = refused(capsys, "infer", "--checkpoint", runs / "cnn", "--data", flat, "--out", tmp_path / "p.h5")
    assert "holds a cnn model for samples of shape (1, 8, 8)" in said and "has samples of shape (8,)" in said
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize(
    "content", [b"hello, I am text\n", bytes(range(256)) * 8, b""], ids=["text", "random bytes", "empty"]
)
def test_a_file_that_is_no_checkpoint_is_said_so_wherever_it_is_named(content, tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    said = refused(capsys, "checkpoint", "info", path)
    assert f"{path} is not an hpcdl checkpoint (" in said and "file an issue" not in said
    for read in (lambda: checkpoint.load(checkpoint.resolve(str(path), tmp_path)), lambda: initial_weights(path, [])):
        with pytest.raises(HpcdlError, match=f"^{path} is not an hpcdl checkpoint [(][^\n]*$"):
            read()


def test_a_truncated_checkpoint_is_damaged_not_foreign(runs, tmp_path):
    path = tmp_path / "cut.pt"
    whole = checkpoint.resolve("latest", runs / "mlp").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(HpcdlError, match=r"^checkpoint .*cut.pt cannot be read, damaged or truncated [(][^\n]*$"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    ("edit", "cause"),
    [
        (lambda m: m["checkpoints"][0].pop("sha256"), "checkpoint entry 1 has no 'sha256'"),
        (lambda m: m["checkpoints"][0].update(bytes="12"), "checkpoint entry 1's 'bytes' is '12', not int"),
        (lambda m: m["checkpoints"].append(7), "checkpoint entry 2 is int, not an object"),
        (lambda m: m.pop("checkpoints"), "no list of 'checkpoints'"),
    ],
    ids=["no sha256", "bytes a string", "entry not an object", "no entries"],
)
def test_a_manifest_missing_a_field_is_damaged_in_one_line(runs, tmp_path, capsys, edit, cause):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "mlp" / "checkpoints", run_dir / "checkpoints")
    manifest = run_dir / "checkpoints" / checkpoint.MANIFEST
    fields = json.loads(manifest.read_text())
    edit(fields)
    manifest.write_text(json.dumps(fields))
    expected = f"{manifest} is damaged ({cause}); remove it"
    assert expected in refused(capsys, "checkpoint", "info", run_dir)
    with pytest.raises(HpcdlError, match="^[^\n]*$") as damaged:
        checkpoint.resolve("auto", run_dir)
    assert expected in str(damaged.value)


def test_resume_takes_a_run_folder_and_says_what_to_pass_otherwise(runs, datasets, tmp_path, capsys):
    sets = (f"data.path='{datasets['synthetic']}'", "model.hidden=[8]", "train.max_steps=3")
    assert train("synthetic-mlp", tmp_path / "continued", *sets, resume=str(runs / "mlp")) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HpcdlError, match=f"^--resume {empty}: no checkpoint in {empty / 'checkpoints'}"):
        checkpoint.resolve(str(empty), tmp_path / "continued")
    with pytest.raises(HpcdlError, match="no such checkpoint file or run folder; give a checkpoint file, a run folder"):
        checkpoint.resolve(str(tmp_path / "nowhere"), tmp_path / "continued")


def leftover_run(run_dir, logs: bool = False):
    """A run folder as a run stopped during its first checkpoint's write leaves it: config.toml, an empty manifest, a
    1 MB `.step-N.pt.partial` (and metrics.jsonl if it logged); its lock released, as the kernel does at its end."""
    folder = checkpoint.checkpoint_dir(run_dir)
    folder.mkdir(parents=True)
    (run_dir / rundir.CONFIG).write_text("[data]\n")
    (run_dir / rundir.LOCK).write_text("{}")
    (folder / checkpoint.MANIFEST).write_text('{"format": 1, "checkpoints": []}\n')
    (folder / ".step-00000004.pt.partial").write_bytes(bytes(1 << 20))
    if logs:
        (run_dir / "metrics.jsonl").write_text('{"event": "start"}\n')
    return folder / ".step-00000004.pt.partial"


def test_a_dead_runs_partial_file_holds_no_run_and_the_next_run_removes_it(datasets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    partial = leftover_run(run_dir)
    sets = (f"data.path='{datasets['synthetic']}'", "model.hidden=[8]", "train.max_steps=2")
    assert train("synthetic-mlp", run_dir, *sets, resume="auto") == 0
    assert "moves to" not in capsys.readouterr().out  # started in the folder itself: nothing there was a run
    assert not partial.exists() and [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000002.pt"]
    # With logs, --resume auto moves the ended start aside, its partial file removed first (its space freed).
    logged = tmp_path / "logged"
    partial = leftover_run(logged, logs=True)
    aside = rundir.check_fresh_start(logged, overwrite=False, auto=True)
    rundir.move_aside(logged, aside)
    assert (aside / "metrics.jsonl").exists() and not (aside / "checkpoints" / partial.name).exists()
    # A restart that cannot resume never advises the --resume it was given.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir / "checkpoints", corrupt / "checkpoints")
    checkpoint.list_checkpoints(corrupt)[0].write_bytes(b"altered")
    for resume in ("auto", "latest"):
        with pytest.raises(HpcdlError, match="no valid checkpoint in") as refused_restart:
            checkpoint.resolve(resume, corrupt)
        advice = str(refused_restart.value).split("; ")[-1]
        assert f"--resume {resume}" not in advice and "--resume auto" not in advice and "--overwrite" in advice
