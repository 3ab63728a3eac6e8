"""Your own model through `[model] factory`: found, called with the data's shapes, checked; bad ones end every rank."""

import textwrap

import pytest
import torch

from hpcdl import checkpoint, config
from hpcdl.config import ModelConfig
from hpcdl.errors import ConfigError
from hpcdl.models import build

from conftest import REPO, hpcdl_train, read_summary
from reference import assert_close_states, plain_mlp, reference_train

EXAMPLES = REPO / "examples"
STEPS, BATCH, LR = 12, 48, 0.05


def write_module(folder, name: str, body: str):
    """A user's factory module `name`.py in `folder`."""
    path = folder / f"{name}.py"
    path.write_text("from torch import nn\n\n" + textwrap.dedent(body))
    return path


def test_factory_keys_parse_and_resolve_next_to_the_config(tmp_path):
    module = f"factory_ok_{tmp_path.name}"
    write_module(
        tmp_path, module, "def net(shape, classes, width=3):\n    return nn.Linear(shape[0], classes * width)\n"
    )
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\npath = "x.h5"\n[model]\nfactory = "{module}:net"\nkwargs = {{ width = 2 }}\n')
    cfg = config.load(str(toml))
    assert cfg.model.factory == f"{module}:net" and cfg.model.kwargs == {"width": 2}
    assert cfg.folder == str(tmp_path.resolve())
    model = build(cfg.model, (5,), 4, seed=0, folder=cfg.folder)
    assert isinstance(model, torch.nn.Linear) and model.out_features == 8
    over = config.load(str(toml), ["model.kwargs={width=5}"])
    assert build(over.model, (5,), 4, seed=0, folder=over.folder).out_features == 20


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["model.factory='no_colon'"], "package.module:function"),
        (["model.kwargs={a=1}"], "only used with model.factory"),
        (["model.factory='m:f'", "model.kwargs=3"], "must be a table"),
    ],
)
def test_bad_factory_keys_are_config_errors(sets, words):
    with pytest.raises(ConfigError, match=words):
        config.load("digits-mlp", sets)


BAD = {
    "missing module": ("no_such_module_xyz:net", None, "cannot import 'no_such_module_xyz'"),
    "missing function": (
        "{m}:absent",
        "def net(shape, classes):\n    return nn.Linear(1, 1)\n",
        "no function 'absent'",
    ),
    "raises": (
        "{m}:net",
        "def net(shape, classes):\n    raise ValueError('too wide')\n",
        "raised ValueError: too wide",
    ),
    "not a module": ("{m}:net", "def net(shape, classes):\n    return 42\n", "returned int, not a torch.nn.Module"),
    "import fails": ("{m}:net", "import not_installed_pkg_xyz\n", "cannot import 'not_installed_pkg_xyz'"),
    "import raises": ("{m}:net", "raise RuntimeError('broken module')\n", "failed: RuntimeError: broken module"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_factory_names_the_factory_and_the_cause(tmp_path, case):
    spec, body, words = BAD[case]
    module = f"factory_{case.replace(' ', '_')}_{tmp_path.name}"
    if body is not None:
        write_module(tmp_path, module, body)
    spec = spec.format(m=module)
    with pytest.raises(ConfigError) as error:
        build(ModelConfig(factory=spec), (4,), 3, seed=0, folder=str(tmp_path))
    assert f"model.factory = '{spec}'" in str(error.value) and words in str(error.value)


def test_factory_model_trains_like_the_package_model(datasets, tmp_path, monkeypatch):
    """examples/my_model.py:mlp on PYTHONPATH, named by --set, equals the package's MLP after K steps."""
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    result = hpcdl_train(
        2,
        "digits-mlp",
        f"data.path='{datasets['synthetic']}'",
        f"run.dir='{tmp_path}'",
        "model.factory='my_model:mlp'",
        "model.kwargs={hidden=[16, 8]}",
        f"train.batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        f"train.lr={LR}",
        "train.optimizer='sgd'",
        "train.epochs=100",
        "run.progress=false",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "model my_model:mlp" in result.stdout
    state = checkpoint.load(checkpoint.resolve("latest", tmp_path))
    package = reference_train(datasets["synthetic"], plain_mlp([16, 8]), seed=0, batch=BATCH, steps=STEPS, lr=LR)
    assert_close_states(state["model"], package)
    assert len(set(read_summary(tmp_path)["param_digests"])) == 1, "ranks' parameters differ"


@pytest.mark.parametrize(
    ("spec", "kwargs", "words"),
    [
        ("my_model:mlp", "{hidden=[8], depth=3}", "raised TypeError"),
        ("not_a_module_q:mlp", "{}", "cannot import 'not_a_module_q'"),
    ],
)
def test_bad_factory_ends_every_rank(datasets, tmp_path, monkeypatch, spec, kwargs, words):
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    run_dir = tmp_path / "run"
    result = hpcdl_train(
        2,
        "digits-mlp",
        f"data.path='{datasets['digits']}'",
        f"run.dir='{run_dir}'",
        f"model.factory='{spec}'",
        f"model.kwargs={kwargs}",
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert f"model.factory = '{spec}'" in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not run_dir.exists(), "a failed start must leave no run folder"
