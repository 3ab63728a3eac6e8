"""Config parsing: named configs, overrides, and bad values rejected with the key's name."""

import pytest

from hpcdl import config
from hpcdl.errors import ConfigError


def test_named_configs_load():
    names = config.named_configs()
    assert {"digits-mlp", "synthetic-mlp", "images-cnn", "sequences-rnn"} <= set(names)
    for name in names:
        cfg = config.load(name)
        assert cfg.data.path and cfg.run.dir


def test_overrides_are_typed():
    cfg = config.load("digits-mlp", ["train.lr=0.5", "model.hidden=[7, 5]", "data.path=x.h5", "run.progress=false"])
    assert cfg.train.lr == 0.5 and cfg.model.hidden == [7, 5]
    assert cfg.data.path == "x.h5" and cfg.run.progress is False


@pytest.mark.parametrize(
    "override,words",
    [
        ("train.bach_size=3", "unknown key 'train.bach_size'"),
        ("nosuch.key=1", "unknown section [nosuch]"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size must be int"),
        ("train.lr=-1", "train.lr"),
        ("model.name=transformer", "model.name = 'transformer' is not one of"),
        ("data.partition=random", "data.partition"),
        ("model.hidden=[3, -1]", "model.hidden"),
        ("run.progress=3", "run.progress must be bool"),
        ("trainlr", "--set expects section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError, match=None) as err:
        config.load("digits-mlp", [override])
    assert words in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a named config"):
        config.load("no-such-config")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(bad))
