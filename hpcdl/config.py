"""Typed configuration: TOML files, named configs, --set overrides, validated at parse time."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from hpcdl.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where samples come from and how they are split across ranks."""

    path: str = ""
    partition: str = "global"  # global | block (how rows are dealt to ranks); "columns" is parallel.mode now
    cache_mb: float = 1024.0  # a rank caches what it reads when it fits this budget
    prefetch: int = 2  # batches read ahead by a background thread; 0 = synchronous
    scan: bool = False  # scan features for NaN/Inf before training
    drop_last: bool = False  # drop the final partial global batch of an epoch

    def check(self) -> None:
        _need(bool(self.path), "data.path", "must name an HDF5 file (see datasets/README.md)")
        _choice("data.partition", self.partition, ("global", "block", "columns"))
        _need(self.cache_mb >= 0, "data.cache_mb", "must be >= 0")
        _need(self.prefetch >= 0, "data.prefetch", "must be >= 0")


# The built-in model families (hpcdl.models builds them and asserts the two lists are equal).
MODEL_NAMES = ("mlp", "cnn", "rnn")
# Floating-point types a model may train in (hpcdl.models.torch_dtype maps them).
DTYPES = ("float32", "float64", "bfloat16", "float16")
# Ways of splitting the work (hpcdl.parallel makes the strategy of each).
MODES = ("data", "pipeline", "tensor", "columns")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which network, and the sizes of its layers (input and output sizes come from the data)."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128])  # mlp
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn
    fc: int = 128  # cnn
    cell: str = "lstm"  # rnn: lstm | gru
    rnn_hidden: int = 64
    rnn_layers: int = 1
    dtype: str = "float32"  # parameters of the built-in models, and the features fed to any model
    factory: str = ""  # "package.module:function" building your own model (see hpcdl.models.from_factory)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the factory

    def check(self) -> None:
        if self.factory:
            module, sep, function = self.factory.partition(":")
            shape = f"= {self.factory!r} must look like 'package.module:function'"
            _need(bool(sep and module and function), "model.factory", shape)
        else:
            _need(not self.kwargs, "model.kwargs", "are only used with model.factory")
        _choice("model.name", self.name, MODEL_NAMES)
        _need(all(h > 0 for h in self.hidden), "model.hidden", "sizes must be positive")
        _need(all(c > 0 for c in self.channels), "model.channels", "sizes must be positive")
        _need(self.fc > 0 and self.rnn_hidden > 0, "model.fc/rnn_hidden", "must be positive")
        _need(self.rnn_layers > 0, "model.rnn_layers", "must be positive")
        _choice("model.cell", self.cell, ("lstm", "gru"))
        _choice("model.dtype", self.dtype, DTYPES)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The optimisation: epochs, the global batch (over all ranks), optimizer and seed."""

    epochs: int = 10
    batch_size: int = 64  # global: split over ranks, so results do not depend on their number
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int = 0  # stop after this many steps in total; 0 = run all epochs

    def check(self) -> None:
        _need(self.epochs > 0, "train.epochs", "must be a positive integer")
        _need(self.batch_size > 0, "train.batch_size", "must be a positive integer")
        _need(self.lr > 0, "train.lr", "must be positive")
        _choice("train.optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        _need(self.max_steps >= 0, "train.max_steps", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where logs and checkpoints go and how often they are written."""

    dir: str = "runs/default"
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # checkpoints kept
    progress: bool = True  # progress bar on rank 0
    warmup_steps: int = 0  # first steps left out of the summary's timings (samples/s, time split)
    watchdog_s: float = 900.0  # a step running longer ends the job with a report of the stuck ranks; 0 = off
    nan_policy: str = "abort"  # abort | skip: what a NaN/Inf loss or gradient does
    check_every: int = 100  # steps between cross-rank checks that replicas hold equal parameters; 0 = off

    def check(self) -> None:
        _need(bool(self.dir), "run.dir", "must name a folder")
        _need(self.watchdog_s >= 0, "run.watchdog_s", "must be >= 0 (0 turns the watchdog off)")
        _choice("run.nan_policy", self.nan_policy, ("abort", "skip"))
        _need(self.check_every >= 0, "run.check_every", "must be >= 0 (0 turns the check off)")
        _need(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")
        _need(self.keep > 0, "run.keep", "must be >= 1")
        _need(self.warmup_steps >= 0, "run.warmup_steps", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the work is split across ranks."""

    mode: str = "data"  # data | pipeline | tensor | columns (mlp: each rank reads its feature columns)
    bucket_mb: float = 25.0  # gradient bucket size: one Iallreduce per bucket
    overlap: bool = True  # start each bucket's Allreduce during backward
    compression: str = "none"  # none | fp16 | bf16: gradients' type on the wire
    accumulate_steps: int = 1  # global batches per optimizer step (communicate on the last)
    stages: int = 1  # pipeline: ranks the model's layers are cut over
    micro_batches: int = 1  # pipeline: micro-batches per global batch
    schedule: str = "1f1b"  # pipeline: gpipe | 1f1b
    balance: str = "params"  # pipeline: params | time (measured per layer), unless cuts are named
    cuts: list[int] = field(default_factory=list)  # pipeline: layer indices where stages 2..S begin
    replicas: int = 1  # pipeline/tensor: data-parallel copies; world = replicas x stages (or x tensor)
    tensor: int = 1  # tensor: ranks each MLP layer pair is split over

    def check(self) -> None:
        _choice("parallel.mode", self.mode, MODES)
        for key in ("stages", "micro_batches", "replicas", "tensor"):
            _need(getattr(self, key) >= 1, f"parallel.{key}", "must be >= 1")
        _choice("parallel.schedule", self.schedule, ("gpipe", "1f1b"))
        _choice("parallel.balance", self.balance, ("params", "time"))
        _need(self.bucket_mb > 0, "parallel.bucket_mb", "must be positive")
        _choice("parallel.compression", self.compression, ("none", "fp16", "bf16"))
        _need(self.accumulate_steps >= 1, "parallel.accumulate_steps", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class Config:
    """A whole run's configuration, one field per TOML section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str = ""  # where it came from (file or named config), for logs and checkpoints
    folder: str = ""  # the config file's folder: where model.factory's module is also looked for
    notes: list[str] = field(default_factory=list)  # said once at start (e.g. a deprecated key)

    def check(self) -> Config:
        """Validate every section; raise ConfigError naming the first bad key."""
        for section in SECTIONS:
            getattr(self, section).check()
        steps = self.parallel.accumulate_steps
        for key, value in (
            ("train.max_steps", self.train.max_steps),
            ("run.checkpoint_every", self.run.checkpoint_every),
        ):
            _need(value % steps == 0, key, f"must be a multiple of parallel.accumulate_steps = {steps}")
        if self.data.partition == "columns":
            # The old spelling of column splitting: still accepted, said once at start (see hpcdl.train).
            mode = self.parallel.mode
            _need(
                mode in ("data", "columns"),
                "data.partition",
                f"= 'columns' needs parallel.mode = 'columns', not {mode!r}",
            )
            self.data.partition, self.parallel.mode = "global", "columns"
            self.notes.append("data.partition = 'columns' is deprecated: use parallel.mode = 'columns'")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as TOML would hold it (for logs and checkpoints)."""
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


SECTIONS = ("data", "model", "train", "run", "parallel")


def _need(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key} {what}")


def _choice(key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config: {key} = {value!r} is not one of {', '.join(map(str, allowed))}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check a TOML value against a field's type; ints are accepted where floats are."""
    if get_origin(kind) is dict:
        # A table passed through as is (e.g. model.kwargs): its values are the user's to check.
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a table, e.g. {{hidden = [64]}}, got {value!r}")
        return dict(value)
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"config: {key} must be {kind.__name__}, got {value!r}")
    return value


def _section_from(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"config: unknown key '{name}.{key}' (known: {', '.join(known)})")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def from_dict(tree: dict[str, Any], source: str = "", folder: str = "") -> Config:
    """Build and validate a Config from a nested dict; unknown sections and keys are errors."""
    for name in tree:
        if name not in SECTIONS:
            raise ConfigError(f"config: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    hints = get_type_hints(Config)
    sections = {name: _section_from(name, hints[name], tree.get(name, {})) for name in SECTIONS}
    return Config(**sections, source=source, folder=folder).check()


def named_configs() -> list[str]:
    """Names of the example configs shipped inside the package."""
    folder = resources.files("hpcdl") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config: file {name_or_path} does not exist")
        text = path.read_text()
    elif name_or_path in named_configs():
        text = (resources.files("hpcdl") / "configs" / f"{name_or_path}.toml").read_text()
    else:
        raise ConfigError(
            f"config: '{name_or_path}' is neither a file nor a named config (named: {', '.join(named_configs())})"
        )
    try:
        return tomllib.loads(text), name_or_path
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {name_or_path} is not valid TOML: {exc}") from None


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value); values are TOML, else plain strings."""
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"config: --set expects section.key=value, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return parts, value


def load(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Read a named config or TOML file, apply --set overrides, and validate."""
    tree, source = _read_toml(name_or_path)
    for assignment in overrides or []:
        (section, key), value = parse_override(assignment)
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise ConfigError(f"config: [{section}] must be a table")
        tree[section][key] = value
    # A named config has no folder of its own: its factory is looked for on sys.path only.
    folder = str(Path(source).resolve().parent) if Path(source).is_file() else ""
    return from_dict(tree, source, folder)
