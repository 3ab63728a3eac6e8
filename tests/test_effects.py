"""Every option takes effect or is refused: generated from the config dataclasses and the argument parsers.

Each config key is set to a valid value other than the run's (PROBES, or one derived from its type and range), in
the setting where it is read (its `read_when` condition, met by CONTEXTS), and trained in one 2-rank job
(tests/scripts/effects.py). The probe must be refused in one line, or its records (summary, epoch records, files,
printed lines) must differ from those of the same setting without it. A key read only under a condition must be
refused in one line when set outside it. Keys whose effect needs a situation a short clean run does not have (a
hang, a NaN, a GPU, more ranks) are listed in SHOWN_ELSEWHERE with the test that shows it. A new key or flag
without a probe fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from hpcdl import config
from hpcdl.cli import build_parser
from hpcdl.data import make

from conftest import REPO, run_mpi

SCRIPT = REPO / "tests" / "scripts" / "effects.py"
TESTS = REPO / "tests"

# The run every probe changes: 90 train rows, 3 steps an epoch (the last one partial), 2 epochs.
BASE = """
[data]
path = "{data}"
[train]
epochs = 2
batch_size = 40
lr = 0.05
[run]
progress = true
"""
TEACHER = "000"  # the first probe's run (the base run): distill.teacher and train.init start from it

# Values (TOML) where the type's generic one would not show or not fit, with the settings that let it show.
PROBES: dict[str, tuple[str, tuple[str, ...]]] = {
    "data.path": ("'{other}'", ()),
    "data.partition": ("'block'", ()),
    "data.block_rows": ("5", ()),
    "data.window_blocks": ("2", ()),
    "data.cache_mb": ("0", ()),
    "data.prefetch": ("0", ()),
    "model.name": ("'cnn'", ("data.path='{images}'",)),
    "model.hidden": ("[4]", ()),
    "model.channels": ("[4]", ()),
    "model.fc": ("8", ()),
    "model.cell": ("'gru'", ()),
    "model.rnn_hidden": ("8", ()),
    "model.rnn_layers": ("2", ()),
    "model.dtype": ("'float64'", ()),
    "model.factory": ("'my_model:mlp'", ()),
    "model.kwargs": ("{{hidden = 4}}", ("model.factory='my_model:mlp'",)),
    "train.epochs": ("3", ()),
    "train.batch_size": ("20", ()),
    "train.optimizer": ("'adam'", ()),
    "train.momentum": ("0.5", ()),
    "train.max_steps": ("2", ()),
    "train.loss": ("'my_model:loss'", ()),
    "train.schedule": ("'cosine'", ()),
    "train.lr_step_every": ("1", ()),
    "train.clip_grad_norm": ("0.01", ()),
    "train.precision": ("'bf16'", ()),
    "train.init": ("'{runs}/000'", ()),
    "run.checkpoint_every": ("2", ()),
    "run.keep": ("1", ()),
    "run.early_stop": ("{{metric = 'loss', patience = 1, mode = 'max'}}", ()),
    "parallel.mode": ("'zero'", ()),
    "parallel.bucket_mb": ("0.0001", ()),
    "parallel.compression": ("'bf16'", ()),
    "parallel.stages": ("1", ("parallel.replicas=2",)),
    "parallel.micro_batches": ("2", ()),
    "parallel.schedule": ("'gpipe'", ("parallel.micro_batches=2",)),
    "parallel.cuts": ("[2]", ()),
    "parallel.replicas": ("2", ("parallel.stages=1",)),
    "parallel.tensor": ("1", ("parallel.replicas=2",)),
    "parallel.local_steps": ("1", ()),
    "parallel.post_local_steps": ("2", ()),
    "prune.start": ("1", ("prune.end=5",)),
    "prune.end": ("5", ()),
    "prune.every": ("2", ("prune.end=5",)),
    "distill.alpha": ("0.9", ()),
    "distill.source": ("'precomputed'", ()),
    "parallel.balance": ("'time'", ()),
    "distill.teacher": ("'{runs}/000'", ()),
    "distill.logits": ("'{runs}/000/model.pt'", ("distill.source='precomputed'",)),
}

# Settings, in the probe and the run it is compared with, without which the key's effect could not show.
WITNESSES: dict[str, tuple[str, ...]] = {
    "run.keep": ("run.checkpoint_every=1",),
    "run.early_stop": ("train.epochs=3",),
}

# What meets a read_when condition (by its words) beyond the one key's value: what that setting needs to run here.
CONTEXTS: dict[str, tuple[str, ...]] = {
    "data.partition = 'chunked'": ("data.partition='chunked'", "data.block_rows=10"),
    "model.name = 'cnn' and no model.factory": ("model.name='cnn'", "data.path='{images}'"),
    "model.name = 'rnn' and no model.factory": ("model.name='rnn'", "data.path='{sequences}'"),
    "parallel.mode = 'pipeline'": ("parallel.mode='pipeline'", "parallel.stages=2"),
    "parallel.mode = 'pipeline' or 'tensor'": ("parallel.mode='pipeline'", "parallel.stages=2"),
    "parallel.mode = 'tensor'": ("parallel.mode='tensor'", "parallel.tensor=2"),
    "prune.final_sparsity > 0": ("prune.final_sparsity=0.5",),
    "distill.teacher or distill.logits is given": ("distill.teacher='{runs}/000'",),
}

# Keys whose effect a short clean 2-rank CPU run cannot show, and the test file that shows it (it must name the key).
SHOWN_ELSEWHERE = {
    "run.dir": "test_run_folder.py",  # every probe here is read from the run.dir it sets
    "run.watchdog_s": "test_hangs.py",  # a stuck rank
    "run.nan_policy": "test_reliability.py",  # a NaN
    "run.check_every": "faults_table.py",  # replicas that diverge
    "train.device": "test_device.py",  # cpu equals auto without a GPU
    "parallel.servers": "test_sync_strategies.py",  # two servers need three ranks or more
    "parallel.max_staleness": "test_sync_strategies.py",  # staleness needs two workers
    "parallel.deterministic": "test_sync_strategies.py",  # an arrival order needs two workers
    "parallel.zero_stage": "test_zero.py",  # the same update; memory per rank differs
    "parallel.balance": "test_pipeline.py",  # a cut by time equals the cut by parameters on this small MLP
}

# Flags argparse itself gives every command.
FLAGS_NOT_TESTED_BY_NAME = {"-h", "--help", "--version"}
# Flags of the benchmarks, scaling and Slurm helpers, and storage options, that no test names yet (found by the test
# below when it was written): a debt to pay down, never to grow. A flag added without a test fails; a flag here that a
# test comes to name must leave this list.
FLAGS_NOT_YET_TESTED = {
    "hpcdl slurm submit --account", "hpcdl slurm submit --job-name", "hpcdl scale project --compute-ms-per-sample",
    "hpcdl scale project --overhead-ms", "hpcdl scale project --params", "hpcdl scale project --micro-batches",
    "hpcdl scale project --activation-bytes", "hpcdl scale project --max-nodes", "hpcdl scale collect --repeat",
    "hpcdl scale run --timeout", "hpcdl scale run --no-report", "hpcdl bench compress --teacher",
    "hpcdl bench compress --temperature", "hpcdl bench compress --extra", "hpcdl bench zero --timeout",
    "hpcdl bench strategies --servers", "hpcdl bench strategies --timeout", "hpcdl bench strategies --plot",
    "hpcdl bench pipeline --stages", "hpcdl bench io --size-mb", "hpcdl bench io --compressions",
    "hpcdl bench io --chunk-kb", "hpcdl bench io --partitions", "hpcdl bench io --modes", "hpcdl bench io --prefetch",
    "hpcdl bench io --timeout", "hpcdl bench comm --timeout", "hpcdl bench allreduce --bucket-mb",
    "hpcdl bench allreduce --compression", "hpcdl bench dp --bucket-mb", "hpcdl bench dp --compression",
    "hpcdl bench dp --models", "hpcdl evaluate --verbose", "hpcdl infer --verbose", "hpcdl train --verbose",
    "hpcdl data convert --compression", "hpcdl data convert --checksum", "hpcdl data make images --channels",
    "hpcdl data make images --height",
    *(f"hpcdl data make {kind} {flag}" for kind in ("digits", "diabetes", "mnist", "synthetic", "images", "sequences")
      for flag in ("--compression", "--checksum")),
}  # fmt: skip


def keys() -> list[tuple[str, dataclasses.Field]]:
    """Every config key, as (section.name, its field)."""
    return [
        (f"{section}.{spec.name}", spec)
        for section in config.SECTIONS
        for spec in dataclasses.fields(getattr(config.Config(), section))
    ]


def generic_value(key: str, spec: dataclasses.Field, base: config.Config) -> str:
    """A valid value other than the base run's, from the field's type and range (TOML)."""
    section, name = key.split(".")
    current = getattr(getattr(base, section), name)
    limits = spec.metadata.get("range")
    if isinstance(current, bool):
        return "true" if not current else "false"
    assert limits is not None, f"{key}: no probe value; add one to PROBES"
    if isinstance(current, int):
        value = current + 1 if limits.holds(current + 1) else current - 1
    else:
        value = current * 2 if current else 0.5
        if not limits.holds(value):
            value = current / 2
    assert limits.holds(value), f"{key}: {value} is out of its range; add a value to PROBES"
    return repr(value)


def context(spec: dataclasses.Field) -> tuple[str, ...]:
    """The settings under which the key is read."""
    read = spec.metadata.get("read_when")
    if read is None or read.words == "no model.factory":
        return ()
    if read.words in CONTEXTS:
        return CONTEXTS[read.words]
    assert read.values, f"add the settings meeting '{read.words}' to CONTEXTS"
    return (f"{read.settings[0]}={read.values[0]!r}",)


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[dict, dict, dict]:
    """Every probe trained in one job: (results by probe name, the probes, the path values)."""
    folder = tmp_path_factory.mktemp("effects")
    paths = {name: folder / f"{name}.h5" for name in ("data", "other", "images", "sequences")}
    make.make_synthetic(paths["data"], n=100, features=6, classes=3, progress=False)
    make.make_synthetic(paths["other"], n=100, features=6, classes=3, seed=1, progress=False)
    make.make_images(paths["images"], n=100, channels=1, height=6, width=6, classes=3, progress=False)
    make.make_sequences(paths["sequences"], n=100, length=4, features=3, classes=3, progress=False)
    (folder / "my_model.py").write_text(
        "import torch\n"
        "def mlp(input_shape, num_classes, hidden=16):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], hidden),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))\n"
        "def loss(outputs, targets):\n"
        "    return torch.nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)\n"
    )
    fill = {**{name: str(path) for name, path in paths.items()}, "runs": str(folder / "runs")}
    (folder / "base.toml").write_text(BASE.format(**fill))
    base = config.load(str(folder / "base.toml"))
    probes = {context_name(()): ()}  # the first: the teacher
    for key, spec in keys():
        if key in SHOWN_ELSEWHERE:
            continue
        value, extra = PROBES.get(key) or (generic_value(key, spec, base), ())
        setting = (*context(spec), *WITNESSES.get(key, ()))
        probes[context_name(setting)] = setting
        probes[key] = (*setting, f"{key}={value}", *extra)
    probes = {name: tuple(s.format(**fill) for s in settings) for name, settings in probes.items()}
    listed = [{"name": name, "settings": list(settings)} for name, settings in probes.items()]
    (folder / "probes.json").write_text(json.dumps(listed))
    out = folder / "results.json"
    result = run_mpi(2, str(SCRIPT), str(folder / "probes.json"), str(out), str(folder / "base.toml"),
                     timeout=240, cwd=folder)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), probes, fill


def context_name(settings: tuple[str, ...]) -> str:
    return "context: " + " ".join(settings)


def probed_keys() -> list[str]:
    return [key for key, _ in keys() if key not in SHOWN_ELSEWHERE]


@pytest.mark.parametrize("key", probed_keys())
def test_each_key_takes_effect_or_is_refused_in_one_line(probed, key):
    results, probes, _ = probed
    setting = context_name((*context(dict(keys())[key]), *WITNESSES.get(key, ())))
    outcome, baseline = results[key], results[setting]
    assert "refused" not in baseline, f"{key}: its setting {setting} was refused: {baseline}"
    if "refused" in outcome:
        assert "\n" not in outcome["refused"] and outcome["refused"], outcome
        return
    changed = [part for part in ("summary", "records", "files", "lines") if outcome[part] != baseline[part]]
    assert changed, f"{key}: {probes[key]} was accepted and changed nothing a user can see (vs {setting})"


def test_keys_shown_elsewhere_are_named_by_their_test():
    for key, test_file in SHOWN_ELSEWHERE.items():
        assert key.split(".")[1] in (TESTS / test_file).read_text(), f"{test_file} does not show {key}"


# For keys read in the named config the refusal test starts from: a setting that leaves their condition.
OUTSIDE = {
    "model.name": "model.factory='m:f'",
    "model.hidden": "model.name='cnn'",
    "parallel.bucket_mb": "parallel.mode='ps-sync'",
    "parallel.overlap": "parallel.mode='ps-sync'",
    "parallel.compression": "parallel.mode='ps-sync'",
}
# Keys whose refusal outside their setting is a more specific message of their own.
REFUSED_AS = {"distill.source": "distill.logits must name the teacher's logits file"}


@pytest.mark.parametrize("key", [key for key, spec in keys() if spec.metadata.get("read_when")])
def test_a_key_outside_the_setting_that_reads_it_is_refused(key):
    spec = dict(keys())[key]
    read, base = spec.metadata["read_when"], config.load("digits-mlp")
    section, name = key.split(".")
    current = getattr(getattr(base, section), name)
    generic = "range" in spec.metadata and not isinstance(current, list) or isinstance(current, bool)
    value = generic_value(key, spec, base) if generic else PROBES[key][0]
    others = [OUTSIDE[key]] if key in OUTSIDE else []
    assert others or not read.holds(base), f"{key} is read in digits-mlp: add a setting that leaves it to OUTSIDE"
    settings = [f"{key}={value.format(other='x.h5', images='x.h5', runs='runs')}", *others]
    with pytest.raises(config.ConfigError, match=REFUSED_AS.get(key, f"{key} = .* takes effect only with")):
        config.load("digits-mlp", settings)


def test_a_named_configs_key_that_nothing_reads_is_left_out_with_a_note():
    cfg = config.load("digits-mlp", ["model.factory='my_model:mlp'"])  # digits-mlp sets model.hidden = [128, 64]
    assert cfg.model.hidden == [128] and "digits-mlp's value is left out" in " ".join(cfg.notes)
    with pytest.raises(config.ConfigError, match=r"model.hidden = \[4\] takes effect only with .* model.factory ="):
        config.load("digits-mlp", ["model.factory='my_model:mlp'", "model.hidden=[4]"])  # the user's own: refused


def test_pruning_with_only_final_sparsity_ramps_over_the_run(probed):
    results, _, _ = probed
    figures = results["prune.final_sparsity"]["summary"]["prune"]
    assert figures["ramp_steps"] == [1, 4, 1] and figures["pruned"] == round(0.5 * figures["weights"])
    assert any("(#% to #% of the run's # for 'auto'" in line for line in results["prune.final_sparsity"]["lines"])


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser, by its command line (e.g. "hpcdl bench dp")."""
    found, todo = [], [("hpcdl", build_parser())]
    while todo:
        name, parser = todo.pop()
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", child) for sub, child in action.choices.items()]
    return found


def test_every_flag_of_every_command_is_exercised_by_a_test():
    sources = "\n".join(path.read_text() for path in [*TESTS.glob("*.py"), *TESTS.glob("scripts/*.py")])
    sources = sources.replace(" ".join(sorted(FLAGS_NOT_YET_TESTED)), "")  # this file's own list names them
    flags = {
        f"{name} {flag}"
        for name, parser in parsers()
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag not in FLAGS_NOT_TESTED_BY_NAME
    }
    named = {flag for flag in flags if re.search(re.escape(flag.split()[-1]) + r"(?![\w-])", sources)}
    untested = sorted(flags - named - FLAGS_NOT_YET_TESTED)
    assert not untested, f"flags no test names (each needs a test of its effect or refusal): {untested}"
    assert FLAGS_NOT_YET_TESTED <= flags, f"no longer flags: {sorted(FLAGS_NOT_YET_TESTED - flags)}"
