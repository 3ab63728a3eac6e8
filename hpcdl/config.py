"""Typed configuration: TOML files, named configs, --set overrides, validated at parse time."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from hpcdl.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: finite, from `low` (excluded with `open_low`) and, with `high`, below it."""

    low: int
    open_low: bool = False
    high: int | None = None
    note: str = ""  # what a boundary value means, said with the message, e.g. "(0 turns the check off)"

    def holds(self, value: float) -> bool:
        """Whether `value` (a number) lies in the range."""
        if isinstance(value, float) and not math.isfinite(value):  # ints are finite (and may exceed a float)
            return False
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value < self.high)

    def words(self, integer: bool) -> str:
        """The range as the message says it, e.g. "a positive integer" or "a finite number > 0"."""
        if integer and self.low == 1 and not self.open_low and self.high is None:
            return "a positive integer"
        words = f"{'' if integer else 'a finite number '}{'>' if self.open_low else '>='} {self.low}"
        return words + (f" and < {self.high}" if self.high is not None else "")


POSITIVE = Range(1)  # counts and sizes
NON_NEGATIVE = Range(0)
ABOVE_ZERO = Range(0, open_low=True)
# 0 <= seed < 2**32: numpy's SeedSequence takes any size and torch.manual_seed up to 2**64, but numpy's legacy
# np.random.seed (RandomState) refuses 2**32 and up; a seed that every RNG takes can be handed on by users' code.
SEEDS = Range(0, high=2**32)
COMPRESSIONS = ("none", "fp16", "bf16")  # gradients' type on the wire (hpcdl.parallel.grad_sync.WIRE_DTYPES)
SCHEDULES = ("constant", "cosine", "step", "onecycle")  # hpcdl.schedule builds each
PRECISIONS = ("fp32", "bf16", "fp16")  # hpcdl.precision
DEVICES = ("auto", "cpu", "cuda")  # hpcdl.device
LOSSES = ("cross_entropy", "mse", "l1", "huber")  # hpcdl.parallel.loss.BUILT_IN_LOSSES
# Keys renamed: the old name still works, said once at start.
RENAMED = {("run", "warmup_steps"): "timing_skip_steps"}


def check_number(name: str, value: Any, limits: Range, integer: bool = False) -> None:
    """Raise ConfigError unless `value` is a number (an int with `integer`, never a bool) within `limits`."""
    kinds = int if integer else int | float
    if not isinstance(value, kinds) or isinstance(value, bool) or not limits.holds(value):
        note = f" {limits.note}" if limits.note else ""
        raise ConfigError(f"{name} must be {limits.words(integer)}{note}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise ConfigError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(str, allowed))}")


def check_flag(name: str, value: Any) -> None:
    """Raise ConfigError unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def check_path(name: str, value: Any) -> None:
    """Raise ConfigError unless `value` is a file path: a non-empty str or os.PathLike (e.g. pathlib.Path)."""
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{name} must be a path (str or pathlib.Path), got {value!r}")


@dataclass(frozen=True)
class ReadWhen:
    """When a key is read at all: set away from its default where `holds` is false, it would do nothing, so
    `Config.check` refuses it (every option takes effect or is refused)."""

    words: str  # the condition as the message says it, e.g. "parallel.mode = 'pipeline'"
    holds: Callable[[Config], bool]
    settings: tuple[str, ...]  # the keys whose values the message reports, e.g. ("parallel.mode",)
    values: tuple = ()  # values of the first setting under which the key is read, where the condition is one key's


def read_when(key: str, *values: Any) -> ReadWhen:
    """Read only when `key` ("section.name") is one of `values`."""
    section, name = key.split(".")
    words = f"{key} = {' or '.join(map(repr, values))}"
    return ReadWhen(words, lambda cfg: getattr(getattr(cfg, section), name) in values, (key,), values)


def _meta(limits: Range | None, read: ReadWhen | None) -> dict[str, Any]:
    return {key: value for key, value in (("range", limits), ("read_when", read)) if value is not None}


def number(default: float, limits: Range, read: ReadWhen | None = None) -> Any:
    """A numeric config field whose values `Config.check` holds to `limits` (and, with `read`, to its condition)."""
    return field(default=default, metadata=_meta(limits, read))


def numbers(default: Callable[[], list], limits: Range, read: ReadWhen | None = None) -> Any:
    """A config field listing numbers, each held to `limits`."""
    return field(default_factory=default, metadata=_meta(limits, read))


def setting(default: Any, read: ReadWhen) -> Any:
    """A config field (text, flag, list or table) read only under `read`'s condition."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=_meta(None, read))
    return field(default=default, metadata=_meta(None, read))


# How rows are dealt to ranks (hpcdl.data.partition makes each); "columns" is the old spelling of parallel.mode.
PARTITIONS = ("global", "block", "chunked")
CHUNKED = read_when("data.partition", "chunked")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where samples come from and how they are split across ranks."""

    path: str = ""
    partition: str = "global"  # global | block | chunked (how rows are dealt to ranks); "columns" is parallel.mode now
    # `chunked` order: rows per block (0: whole HDF5 chunks, about 1 MiB) and blocks shuffled together per window.
    block_rows: int = number(0, Range(0, note="(0: whole chunks of the file, about 1 MiB)"), CHUNKED)
    window_blocks: int = number(16, POSITIVE, CHUNKED)  # hpcdl.data.chunked.WINDOW_BLOCKS (tests hold them equal)
    cache_mb: float = number(1024.0, NON_NEGATIVE)  # a rank caches what it reads when it fits this budget
    prefetch: int = number(2, NON_NEGATIVE)  # batches read ahead by a background thread; 0 = synchronous
    scan: bool = False  # scan features for NaN/Inf before training
    drop_last: bool = False  # drop the final partial global batch of an epoch

    def check(self) -> None:
        _need(bool(self.path), "data.path", "must name an HDF5 file (see datasets/README.md)")
        _choice("data.partition", self.partition, (*PARTITIONS, "columns"))


# The built-in model families (hpcdl.models builds them and asserts the two lists are equal).
MODEL_NAMES = ("mlp", "cnn", "rnn")
# Floating-point types a model may train in (hpcdl.models.torch_dtype maps them).
DTYPES = ("float32", "float64", "bfloat16", "float16")
# Ways of splitting the work (hpcdl.parallel makes the strategy of each).
MODES = ("data", "pipeline", "tensor", "columns", "local-sgd", "ps-sync", "ps-async", "zero")
# The modes that read each mode-specific key (each strategy's maker in hpcdl.parallel takes exactly these).
PIPELINE = read_when("parallel.mode", "pipeline")
BUCKETED = read_when("parallel.mode", "data", "pipeline", "tensor", "local-sgd", "zero")  # gradient buckets
OVERLAPPED = read_when("parallel.mode", "data", "pipeline", "tensor", "local-sgd")
COMPRESSED = read_when("parallel.mode", "data", "pipeline", "tensor")
REPLICATED = read_when("parallel.mode", "pipeline", "tensor")
LOCAL_SGD = read_when("parallel.mode", "local-sgd")
SERVERS = read_when("parallel.mode", "ps-sync", "ps-async")
ASYNC = read_when("parallel.mode", "ps-async")


def built_in(name: str) -> ReadWhen:
    """Read only by the built-in model `name` (model.factory builds the user's own instead)."""
    words = f"model.name = {name!r} and no model.factory"
    return ReadWhen(words, lambda c: c.model.name == name and not c.model.factory, ("model.name", "model.factory"),
                    (name,))  # fmt: skip


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which network, and the sizes of its layers (input and output sizes come from the data)."""

    name: str = setting("mlp", ReadWhen("no model.factory", lambda c: not c.model.factory, ("model.factory",)))
    hidden: list[int] = numbers(lambda: [128], POSITIVE, built_in("mlp"))
    channels: list[int] = numbers(lambda: [32, 64], POSITIVE, built_in("cnn"))
    fc: int = number(128, POSITIVE, built_in("cnn"))
    cell: str = setting("lstm", built_in("rnn"))  # lstm | gru
    rnn_hidden: int = number(64, POSITIVE, built_in("rnn"))
    rnn_layers: int = number(1, POSITIVE, built_in("rnn"))
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
        _choice("model.cell", self.cell, ("lstm", "gru"))
        _choice("model.dtype", self.dtype, DTYPES)


STEP_SCHEDULE = read_when("train.schedule", "step")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The optimisation: epochs, the global batch (over all ranks), optimizer and seed."""

    epochs: int = number(10, POSITIVE)
    batch_size: int = number(64, POSITIVE)  # global: split over ranks, so results do not depend on their number
    lr: float = number(0.01, ABOVE_ZERO)
    optimizer: str = "sgd"  # sgd | adam | adamw
    # No upper bound: torch's SGD takes momentum >= 1 (and diverges), so refusing it here would be a guess.
    momentum: float = number(0.9, NON_NEGATIVE, read_when("train.optimizer", "sgd"))
    weight_decay: float = number(0.0, NON_NEGATIVE)
    seed: int = number(0, SEEDS)
    max_steps: int = number(0, NON_NEGATIVE)  # stop after this many steps in total; 0 = run all epochs
    # "" = the task's default (cross_entropy for classification, mse for regression); or mse, l1, huber,
    # cross_entropy, or "module:function" taking (outputs, targets) and returning the MEAN loss over samples.
    loss: str = ""
    schedule: str = "constant"  # constant | cosine | step | onecycle: the learning rate over optimizer steps
    lr_warmup_steps: int = number(0, NON_NEGATIVE)  # optimizer steps of linear warm-up from 0 to lr
    lr_step_every: int = number(0, NON_NEGATIVE, STEP_SCHEDULE)  # steps between decays; 0 = a third of the run
    lr_gamma: float = number(0.1, ABOVE_ZERO, STEP_SCHEDULE)  # the factor of each decay
    clip_grad_norm: float = number(0.0, NON_NEGATIVE)  # clip the whole model's gradient to this L2 norm; 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16: the forward under torch.autocast; weights stay in model.dtype
    device: str = "auto"  # auto (a GPU when one is visible) | cpu | cuda: each rank on its node-local GPU
    # A run folder or checkpoint whose model weights a fresh run starts from (fine-tuning, e.g. a model hpcdl prune
    # made smaller); its optimizer, position and schedule are not taken. "" = the seeded initialisation.
    init: str = ""

    def check(self) -> None:
        _choice("train.optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        _choice("train.device", self.device, DEVICES)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.precision", self.precision, PRECISIONS)
        if self.loss and ":" not in self.loss:
            _choice("train.loss", self.loss, LOSSES)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where logs and checkpoints go and how often they are written."""

    dir: str = "runs/default"
    checkpoint_every: int = number(0, NON_NEGATIVE)  # steps between checkpoints; 0 = only at the end
    keep: int = number(3, POSITIVE)  # checkpoints kept
    progress: bool = True  # progress bar on rank 0
    timing_skip_steps: int = number(0, NON_NEGATIVE)  # first steps left out of the summary's timings (samples/s)
    log_every: int = number(0, NON_NEGATIVE)  # optimizer steps between step records in metrics.jsonl; 0 = none
    # Stop when a metric of the epoch records has not improved for `patience` epochs, e.g.
    # {metric = "val_loss", patience = 5} (mode "min" or "max", default: max for acc and r2, else min).
    early_stop: dict[str, Any] = field(default_factory=dict)
    keep_best: bool = False  # keep checkpoints/best.pt: the epoch best by early_stop's metric (else val_loss)
    tensorboard: bool = False  # also write the step and epoch records as TensorBoard events in RUN_DIR/tensorboard
    # A step running longer ends the job with a report of the stuck ranks: "auto" derives the limit from
    # measured step times (see hpcdl.watchdog); a number of seconds fixes it; 0 turns it off.
    watchdog_s: float | str = "auto"
    nan_policy: str = "abort"  # abort | skip: what a NaN/Inf loss or gradient does
    # Steps between cross-rank checks that replicas hold equal parameters.
    check_every: int = number(100, Range(0, note="(0 turns the check off)"))

    def check(self) -> None:
        _need(bool(self.dir), "run.dir", "must name a folder")
        auto = self.watchdog_s == "auto"
        _need(auto or _finite(self.watchdog_s) and self.watchdog_s >= 0, "run.watchdog_s",
              "must be >= 0 seconds (0 turns the watchdog off) or 'auto'")  # fmt: skip
        _choice("run.nan_policy", self.nan_policy, ("abort", "skip"))
        if self.early_stop:
            unknown = sorted(set(self.early_stop) - {"metric", "patience", "mode"})
            _need(not unknown, "run.early_stop", f"has unknown key(s) {unknown} (keys: metric, patience, mode)")
            _need(
                isinstance(self.early_stop.get("metric"), str),
                "run.early_stop",
                "needs a metric of the epoch records, e.g. {metric = 'val_loss', patience = 5}",
            )
            patience = self.early_stop.setdefault("patience", 5)
            check_number("config: run.early_stop.patience", patience, POSITIVE, integer=True)
            metric = self.early_stop["metric"]
            mode = self.early_stop.setdefault("mode", "max" if metric.endswith(("acc", "r2")) else "min")
            _choice("run.early_stop.mode", mode, ("min", "max"))


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the work is split across ranks."""

    # data | pipeline | tensor | columns (mlp: each rank reads its feature columns) | local-sgd | ps-sync | ps-async
    # | zero (sharded data parallel)
    mode: str = "data"
    bucket_mb: float = number(25.0, ABOVE_ZERO, BUCKETED)  # gradient bucket size: one Iallreduce per bucket
    overlap: bool = setting(True, OVERLAPPED)  # start each bucket's Allreduce during backward
    compression: str = setting("none", COMPRESSED)  # none | fp16 | bf16: gradients' type on the wire
    accumulate_steps: int = number(1, POSITIVE)  # global batches per optimizer step (communicate on the last)
    stages: int = number(1, POSITIVE, PIPELINE)  # ranks the model's layers are cut over
    micro_batches: int = number(1, POSITIVE, PIPELINE)  # micro-batches per global batch
    schedule: str = setting("1f1b", PIPELINE)  # gpipe | 1f1b
    balance: str = setting("params", PIPELINE)  # params | time (measured per layer), unless cuts are named
    # layer indices where stages 2..S begin (checked against the model's layers by parallel.layout)
    cuts: list[int] = setting([], PIPELINE)
    replicas: int = number(1, POSITIVE, REPLICATED)  # data-parallel copies; world = replicas x stages/tensor
    tensor: int = number(1, POSITIVE, read_when("parallel.mode", "tensor"))  # ranks each MLP layer pair is split over
    local_steps: int = number(4, POSITIVE, LOCAL_SGD)  # optimizer steps each rank takes alone between averages
    post_local_steps: int = number(0, NON_NEGATIVE, LOCAL_SGD)  # data-parallel steps before local SGD begins
    average_optimizer: bool = setting(False, LOCAL_SGD)  # average the optimizer state (momentum, moments) too
    servers: int = number(1, POSITIVE, SERVERS)  # the first ranks, holding the parameters
    max_staleness: int = number(4, NON_NEGATIVE, ASYNC)  # updates a worker's parameters may lag the servers'
    deterministic: bool = setting(False, ASYNC)  # servers apply gradients in worker order, not as they arrive
    # 1 splits the optimizer state, 2 also the summed gradients
    zero_stage: int = number(2, Range(1, high=3), read_when("parallel.mode", "zero"))

    def check(self) -> None:
        _choice("parallel.mode", self.mode, MODES)
        _choice("parallel.schedule", self.schedule, ("gpipe", "1f1b"))
        _choice("parallel.balance", self.balance, ("params", "time"))
        _choice("parallel.compression", self.compression, COMPRESSIONS)


# Modes whose loss sees each row's whole sample (hpcdl.distill's online teacher scores the same rows); with columns a
# rank reads only its columns of the features, so only the precomputed logits (looked up by sample index) serve it.
ONLINE_TEACHER_MODES = ("data", "zero", "local-sgd", "ps-sync", "ps-async", "pipeline", "tensor")


DISTILLING = ReadWhen("distill.teacher or distill.logits is given", lambda c: c.distill.enabled,
                      ("distill.teacher", "distill.logits"))  # fmt: skip


@dataclass(kw_only=True, slots=True)
class DistillConfig:
    """Knowledge distillation (hpcdl.distill): on when `teacher` (online) or `logits` (precomputed) is given."""

    teacher: str = ""  # a trained run's folder (its newest valid checkpoint) or a checkpoint; "" = off
    temperature: float = number(2.0, ABOVE_ZERO, DISTILLING)  # T: both softmaxes at T, the KL term times T^2
    alpha: float = setting(0.5, DISTILLING)  # weight of the KL term; 1 - alpha weighs the hard-label cross-entropy
    source: str = setting("online", DISTILLING)  # online: the teacher scores each batch | precomputed: logits read
    logits: str = ""  # precomputed: `hpcdl infer --split train --outputs logits` of the teacher

    @property
    def enabled(self) -> bool:
        return bool(self.teacher or self.logits)

    def check(self) -> None:
        _choice("distill.source", self.source, ("online", "precomputed"))
        alpha = self.alpha
        _need(_finite(alpha) and 0 <= alpha <= 1, "distill.alpha", f"must be within [0, 1], got {alpha!r}")
        if self.source == "online":
            _need(not self.logits, "distill.logits", "is read only with distill.source = 'precomputed'")
        else:
            _need(bool(self.logits), "distill.logits", "must name the teacher's logits file (source 'precomputed')")


PRUNING = ReadWhen("prune.final_sparsity > 0", lambda c: c.prune.final_sparsity > 0, ("prune.final_sparsity",))


@dataclass(kw_only=True, slots=True)
class PruneConfig:
    """Gradual magnitude pruning during training (hpcdl.compress.prune): one global threshold over the model's
    Linear/Conv weights, sparsity ramped cubically from 0 at `start` to `final_sparsity` at `end` (steps).
    "auto" start and end span hpcdl.compress.prune.AUTO_RAMP of the run's steps (the run says which); start = end
    = 0 prunes at once and keeps the zeros (what `hpcdl prune` writes for fine-tuning)."""

    final_sparsity: float = number(0.0, Range(0, high=1, note="(0 turns pruning off)"))
    start: int | str = setting("auto", PRUNING)  # the step of the ramp's first update (sparsity 0 there)
    end: int | str = setting("auto", PRUNING)  # the step it reaches final_sparsity; masks are kept from then on
    every: int = number(0, Range(0, note="(0: a tenth of the ramp)"), PRUNING)  # steps between mask updates

    def check(self) -> None:
        for key in ("start", "end"):
            value = getattr(self, key)
            if value != "auto":
                check_number(f"config: prune.{key}", value, Range(0, note="(or 'auto')"), integer=True)
        if self.final_sparsity > 0 and "auto" not in (self.start, self.end):  # else the ramp is not read
            _need(self.end >= self.start, "prune.end", f"must be >= prune.start = {self.start}, got {self.end}")


@dataclass(kw_only=True, slots=True)
class Config:
    """A whole run's configuration, one field per TOML section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    source: str = ""  # where it came from (file or named config), for logs and checkpoints
    folder: str = ""  # the config file's folder: where model.factory's module is also looked for
    notes: list[str] = field(default_factory=list)  # said once at start (e.g. a deprecated key)
    # Keys a named config (shipped with hpcdl) set and the user did not: where nothing reads one, it is dropped with
    # a note instead of refused (a factory on digits-mlp need not undo its model.hidden).
    inherited: set[tuple[str, str]] = field(default_factory=set)

    def check(self) -> Config:
        """Validate every section; raise ConfigError naming the first bad key."""
        for section in SECTIONS:
            _check_numbers(section, getattr(self, section))
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
        pruned = self.prune.final_sparsity > 0 and self.parallel.mode in ("local-sgd", "ps-sync", "ps-async")
        _need(not pruned, "prune.final_sparsity", f"> 0 needs parallel.mode data, pipeline, tensor, columns or zero, "
              f"not {self.parallel.mode!r} (its ranks' weights differ between syncs)")  # fmt: skip
        self._check_read()
        mode = self.parallel.mode
        online = self.distill.enabled and self.distill.source == "online"
        _need(not online or mode in ONLINE_TEACHER_MODES, "distill.source",
              f"= 'online' needs the whole samples, but parallel.mode {mode!r} gives each rank only its feature "
              "columns: precompute the teacher's logits (distill.source = 'precomputed')")  # fmt: skip
        return self

    def _check_read(self) -> None:
        """Refuse a key set away from its default where nothing reads it (e.g. parallel.stages in mode 'data')."""
        for section in SECTIONS:
            values = getattr(self, section)
            for spec in dataclasses.fields(values):
                read = spec.metadata.get("read_when")
                value = getattr(values, spec.name)
                if read is None or read.holds(self) or value == _default(spec):
                    continue
                unread = f"{section}.{spec.name} = {value!r} takes effect only with {read.words}"
                if (section, spec.name) in self.inherited:
                    setattr(values, spec.name, _default(spec))
                    self.notes.append(f"{unread}: the named config {self.source}'s value is left out")
                    continue
                now = ", ".join(f"{key} = {_value(self, key)!r}" for key in read.settings)
                raise ConfigError(f"config: {unread} (here {now}): remove it, or set {read.settings[0]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as TOML would hold it (for logs and checkpoints); [distill] only when on."""
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS if s != "distill" or self.distill.enabled}


SECTIONS = ("data", "model", "train", "run", "parallel", "prune", "distill")


def _need(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key} {what}")


def _choice(key: str, value: object, allowed: tuple) -> None:
    check_choice(f"config: {key}", value, allowed)


def _check_numbers(section: str, values: Any) -> None:
    """Every numeric key of a section (each item of a list of numbers) within the Range its field declares."""
    hints = get_type_hints(type(values))
    for spec in dataclasses.fields(values):
        limits = spec.metadata.get("range")
        if limits is None:
            continue
        key, value = f"config: {section}.{spec.name}", getattr(values, spec.name)
        integer = int in (hints[spec.name], *get_args(hints[spec.name]))  # int, or list[int]
        if isinstance(value, list):
            for index, item in enumerate(value):
                check_number(f"{key}[{index}]", item, limits, integer)
        else:
            check_number(key, value, limits, integer)


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check a TOML value against a field's type; ints are accepted where floats are."""
    if isinstance(kind, types.UnionType):  # e.g. float | str: the first member the value fits
        for member in get_args(kind):
            try:
                return _coerce(key, value, member)
            except ConfigError:
                continue
        names = " or ".join(member.__name__ for member in get_args(kind))
        raise ConfigError(f"config: {key} must be {names}, got {value!r}")
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


def from_dict(
    tree: dict[str, Any], source: str = "", folder: str = "", inherited: set[tuple[str, str]] | None = None
) -> Config:
    """Build and validate a Config from a nested dict; unknown sections and keys are errors. `inherited`: the keys
    a named config set (not the user), which are dropped with a note where nothing reads them."""
    for name in tree:
        if name not in SECTIONS:
            raise ConfigError(f"config: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    notes = []
    for (section, old), new in RENAMED.items():
        table = tree.get(section)
        if isinstance(table, dict) and old in table:
            _need(new not in table, f"{section}.{old}", f"is the old name of {section}.{new}: give only one of them")
            tree = {**tree, section: {(new if key == old else key): value for key, value in table.items()}}
            notes.append(f"{section}.{old} is now {section}.{new} (the old name still works)")
    hints = get_type_hints(Config)
    sections = {name: _section_from(name, hints[name], tree.get(name, {})) for name in SECTIONS}
    return Config(**sections, source=source, folder=folder, notes=notes, inherited=inherited or set()).check()


def named_configs() -> list[str]:
    """Names of the example configs shipped inside the package."""
    folder = resources.files("hpcdl") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config: file {name_or_path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config: {name_or_path} is not a text file (byte {exc.start} is not UTF-8): "
                              "--config takes a TOML file or a named config") from None  # fmt: skip
        except OSError as exc:
            raise ConfigError(f"config: cannot read {name_or_path}: {exc.strerror or exc}") from None
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
    named = not Path(source).is_file()  # a config shipped inside the package
    inherited = {(s, k) for s, table in tree.items() if isinstance(table, dict) for k in table} if named else set()
    for assignment in overrides or []:
        (section, key), value = parse_override(assignment)
        inherited.discard((section, key))
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise ConfigError(f"config: [{section}] must be a table")
        tree[section][key] = value
    # A named config has no folder of its own: its factory is looked for on sys.path only.
    folder = str(Path(source).resolve().parent) if Path(source).is_file() else ""
    return from_dict(tree, source, folder, inherited)
