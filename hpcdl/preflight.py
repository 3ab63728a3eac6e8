"""Everything a run checks and prepares before its first step, on every rank: all fail together or none does.

Data, layout, model (does it take these samples and give one output per class? does it fit in
memory?), checkpoint, and the run folder (one live run, no fresh start over an old run, a resume
whose config change keeps the saved position meaningful, every path writable, room for a
checkpoint). Nothing is written until every check has passed on every rank.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from hpcdl import checkpoint, distill, outputs, rundir
from hpcdl.comm import World
from hpcdl.config import Config
from hpcdl.data.schema import DatasetInfo, validate
from hpcdl.device import CPU, run_device
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.metrics import check_tensorboard
from hpcdl.models import build, is_meta, materialize, torch_dtype
from hpcdl.parallel.layout import Layout
from hpcdl.parallel.loss import CLASSIFICATION, LossFn, Objective, make_objective

# Bytes per parameter beside the parameter itself: its gradient, and the optimizer's slots.
OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2}


@dataclass
class RunState:
    """Where a run is: what a checkpoint must hold to continue it exactly (besides model, optimizer and RNG)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped_steps: int = 0  # steps dropped on every rank for a non-finite loss or gradient

    def to_checkpoint(self) -> dict[str, int]:
        """The fields as a checkpoint stores them (top-level keys)."""
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        """The position saved in a checkpoint."""
        return cls(**{f.name: int(state.get(f.name, 0)) for f in fields(cls)})

    def advance(self) -> None:
        """One step done; a complete epoch rolls over only at its end (see `end_epoch`)."""
        self.step_in_epoch += 1
        self.global_step += 1

    def end_epoch(self, steps_per_epoch: int) -> float:
        """Close the epoch if all its steps ran; the epoch count as a (fractional) number for logs."""
        if self.step_in_epoch >= steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            return float(self.epoch)
        return self.epoch + self.step_in_epoch / steps_per_epoch

    def steps_left(self, epochs: int, steps_per_epoch: int) -> int:
        """Steps from here to the end of epoch `epochs` (0 when the run is complete)."""
        return max(0, (epochs - self.epoch) * steps_per_epoch - self.step_in_epoch)


@dataclass
class Setup:
    """Everything a run needs, built and checked before the first collective."""

    info: DatasetInfo
    layout: Layout
    model: torch.nn.Module
    resume_state: dict[str, Any] | None
    model_name: str = ""  # for the start line: the config's model, the factory, or a user's class
    position: RunState = field(default_factory=RunState)
    move_aside: Path | None = None  # --overwrite: where the old run goes
    lock: rundir.RunLock | None = None  # rank 0: the run folder's lock, held for the run
    objective: Objective = CLASSIFICATION  # the data's task and the loss (train.loss, or hpcdl.fit's loss_fn)
    device: torch.device = CPU  # where this rank computes (train.device)
    weights: dict[str, torch.Tensor] | None = None  # the unsplit model to start from: a resume's or train.init's
    created: list[Path] = field(default_factory=list)  # rank 0: the folders claiming the run folder made


def prepare(
    cfg: Config, world: World, resume: str | None, model: torch.nn.Module | None = None, overwrite: bool = False,
    loss_fn: LossFn | None = None,
) -> Setup:  # fmt: skip
    """Validate data, layout, model, loss, checkpoint and run folder on every rank; then claim the run folder.

    `model` is a user's own network and `loss_fn` their loss (hpcdl.fit); otherwise the config's are used.
    """
    info = world.agree(lambda: validate(cfg.data.path, scan=cfg.data.scan) if world.is_root else None)
    info = world.bcast(info, root=0)
    notes: list[str] = [*cfg.notes, *info.warnings]  # deprecated keys, data warnings, ...: said aloud below
    if cfg.data.scan:  # what the scan found is said too: a check that passed in silence cannot be told from none
        notes.append(f"data.scan: no NaN or Inf in the features of {', '.join(f'/{s}' for s in info.sizes)}")

    def build_rank_parts() -> Setup:
        layout = Layout.from_config(cfg, world.size)
        objective = make_objective(info.task, cfg.train.loss, info.target_shape, cfg.folder, loss_fn)
        objective = distill.wrap(cfg, info, objective, notes)  # [distill]: the teacher's logits in the loss
        check_early_stop(cfg, objective)
        if cfg.run.tensorboard:
            check_tensorboard()
        built = model if model is not None else build_model(cfg, info, layout, world)
        layout.check_model(built)
        layout.check_data(info)
        check_output(built, info, torch_dtype(cfg.model.dtype))
        loss_name = "hpcdl.fit: loss_fn" if loss_fn is not None else f"train.loss = {cfg.train.loss!r}"
        check_loss(objective, info, torch_dtype(cfg.model.dtype), loss_name)
        path = checkpoint.resolve(resume, cfg.run.dir, notes) if resume else None
        state = checkpoint.load(path) if path else None
        name = type(model).__name__ if model is not None else cfg.model.factory or cfg.model.name
        device = run_device(cfg.train.device, layout.mode, world.local_rank, notes)
        setup = Setup(info, layout, built, state, name, objective=objective, device=device)
        if state:  # the config's changes first: they say why weights would not fit
            setup.position = resume_position(state, cfg, info, notes)
            checkpoint.restore_model(built, state, path)
        elif cfg.train.init:
            path, state = initial_weights(cfg.train.init, notes)
            checkpoint.restore_model(built, state, path)
        setup.weights = state and state["model"]
        if world.is_root:  # the run folder is rank 0's: its verdict is shared by agree
            plan_run_folder(cfg, setup, overwrite, resume == "auto", notes)
        return setup

    setup = world.agree(build_rank_parts)
    setup.move_aside = world.bcast(setup.move_aside, root=0)
    setup.lock = world.agree(lambda: claim_run_folder(cfg, setup) if world.is_root else None)
    for note in notes:
        world.log(f"hpcdl: {note}")
    return setup


def initial_weights(target: str, notes: list[str]) -> tuple[Path, dict[str, Any]]:
    """train.init: the checkpoint (a run folder's newest valid one) a fresh run takes its model's weights from."""
    where = f"config: train.init = {target!r}"
    path = checkpoint.locate(target, notes, where)
    state = checkpoint.load(path)
    if not isinstance(state.get("model"), dict):
        raise HpcdlError(f"{where}: {path} holds no model weights")
    notes.append(f"starting from the weights of {path} (train.init)")
    return path, state


def build_model(cfg: Config, info: DatasetInfo, layout: Layout, world: World) -> torch.nn.Module:
    """The config's model: its size checked against memory on the meta device, then allocated where the layout says."""
    dtype, seed = torch_dtype(cfg.model.dtype), cfg.train.seed
    model = build(cfg.model, info.feature_shape, info.outputs, seed, cfg.folder, "meta", dtype)
    if is_meta(model):
        check_memory(model, cfg.train.optimizer, world.local_size, layout)
        if layout.model_device != "meta":
            materialize(enumerate(model), seed)
    return model


def check_memory(model: torch.nn.Module, optimizer: str, ranks_on_node: int, layout: Layout) -> None:
    """A model whose parameters, gradients and optimizer state cannot fit in this node's memory is refused."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    split = layout.stages * layout.tensor  # pipeline stages and tensor shards hold part of the model each
    needed = params * (2 + OPTIMIZER_SLOTS[optimizer]) // split * ranks_on_node
    available = _available_memory()
    if available and needed > available:
        raise ConfigError(
            f"the model needs about {needed / 2**30:.1f} GiB on this node ({ranks_on_node} rank(s) x parameters, "
            f"gradients and {optimizer} state of {params / 2**30:.2f} GiB / {split}), but {available / 2**30:.1f} GiB "
            "is available; use a smaller [model], fewer ranks per node, or split it (parallel.mode = 'pipeline' "
            "or 'tensor')"
        )


def _available_memory() -> int:
    """MemAvailable of this node in bytes (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_output(model: torch.nn.Module, info: DatasetInfo, dtype: torch.dtype) -> None:
    """The model takes this data's samples and gives one output per class: said before step 0, not as a traceback."""
    device = "meta" if is_meta(model) else "cpu"
    sample = torch.zeros(2, *info.feature_shape, dtype=dtype, device=device)
    was_training = model.training
    model.eval()  # no batch-norm statistics change, no dropout
    try:
        with torch.no_grad():
            out = model(sample)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        cause = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(
            f"the model does not take this data's samples (shape {tuple(info.feature_shape)}, {dtype}): {cause}; "
            "check [model] (or the factory) against `hpcdl data info FILE`"
        ) from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out) or tuple(out.shape) != (2, info.outputs):
        got = tuple(out.shape[1:]) if torch.is_tensor(out) else type(out).__name__
        has = (
            f"{info.num_classes} classes"
            if info.task == "classification"
            else f"regression targets of shape {tuple(info.target_shape)}"
        )
        raise ConfigError(
            f"the model gives {got} per sample, but the data has {has}: its last layer must have {info.outputs} outputs"
        )


def check_loss(objective: Objective, info: DatasetInfo, dtype: torch.dtype, name: str) -> None:
    """The loss takes the model's outputs and this data's targets and gives one number with a gradient: said before
    step 0 (`name` says where the loss came from), not as a traceback at step 1."""
    # Zeros of the shape check_output found, not the model's own output: a split model lives on the meta device.
    outputs = torch.zeros(2, info.outputs, dtype=dtype, requires_grad=True)
    if info.task == "classification":
        targets = torch.zeros(2, dtype=torch.int64)
    else:
        targets = torch.zeros(2, *info.target_shape, dtype=torch.float32)  # as the loader gives them
    shapes = f"outputs {tuple(outputs.shape)} {dtype} and targets {tuple(targets.shape)} {targets.dtype}"
    expected = "a loss is a function (outputs, targets) -> their mean loss over the samples, one number"
    try:
        loss = objective.loss_fn(objective.outputs_as_targets(outputs), targets)
    except Exception as exc:  # noqa: BLE001 - the user's function: any failure is theirs to see in one line
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{name} fails on {shapes}: {type(exc).__name__}: {cause}; {expected}") from exc
    if not torch.is_tensor(loss):
        problem = f"it returned {type(loss).__name__}, not a tensor"
    elif loss.numel() != 1:
        problem = f"it returned a tensor of shape {tuple(loss.shape)} (use reduction='mean')"
    elif not loss.requires_grad:
        problem = "its result does not depend on the outputs, so no gradient would reach the model"
    else:
        return
    raise ConfigError(f"{name} on {shapes}: {problem}; {expected}")


def check_early_stop(cfg: Config, objective: Objective) -> None:
    """run.early_stop and run.keep_best watch a metric the epoch records of this task hold."""
    if not cfg.run.early_stop:
        return
    metric, known = cfg.run.early_stop["metric"], objective.metric_names()
    if metric not in known:
        raise ConfigError(f"config: run.early_stop.metric = {metric!r} is not a metric of this run: {', '.join(known)}")


def plan_run_folder(cfg: Config, setup: Setup, overwrite: bool, auto: bool, notes: list[str]) -> None:
    """Rank 0: is the run folder free, and may a fresh run start in it (`auto`: --resume auto found nothing)."""
    run_dir = Path(cfg.run.dir)
    # The nearest path that exists: run.dir itself, or the folder it will be created in (or a file in the way).
    nearest = outputs.nearest_existing(run_dir)
    if not nearest.is_dir():
        inside = "" if nearest == run_dir else f" lies inside {nearest}, which"
        raise HpcdlError(f"run.dir {run_dir}{inside} is a file, not a folder; choose another run.dir")
    folders = [(checkpoint.checkpoint_dir(run_dir), "checkpoints")]
    folders += [(run_dir / "tensorboard", "TensorBoard events")] if cfg.run.tensorboard else []
    for folder, what in folders:
        if folder.exists() and not folder.is_dir():
            raise HpcdlError(f"{folder} is a file, not a folder: {what} cannot be written; remove or rename it")
    rundir.check_free(run_dir)
    if setup.resume_state is None:
        setup.move_aside = rundir.check_fresh_start(run_dir, overwrite, auto)
        if setup.move_aside:
            why = "--overwrite" if overwrite else "--resume auto: no checkpoint to continue, so the run starts over"
            notes.append(f"{why}: the previous run in {run_dir} moves to {setup.move_aside}")


def dataset_identity(info: DatasetInfo) -> dict[str, Any]:
    """What a checkpoint records of its dataset: a moved file is the same data only if these agree."""
    identity = {"sizes": dict(info.sizes), "feature_shape": list(info.feature_shape), "num_classes": info.num_classes}
    if info.task != "classification":  # classification's record stays as checkpoints have always held it
        identity.update(task=info.task, target_shape=list(info.target_shape))
    return identity


def resume_position(state: dict[str, Any], cfg: Config, info: DatasetInfo, notes: list[str]) -> RunState:
    """The saved position under the new config: changes that keep it meaningful are said, others refused."""
    saved_cfg = state.get("config") or {}
    changes = rundir.config_changes(saved_cfg, cfg.to_dict()) if saved_cfg else []
    refused = rundir.refused_changes(changes)
    if refused:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes if name in refused)
        raise HpcdlError(
            f"--resume: the run in {cfg.run.dir} was trained with another {', '.join(refused)} ({listed}); "
            "the saved position and weights mean something else under it: resume with the run's values, "
            "or start a new run.dir"
        )
    moved = any(name == "data.path" for name, _, _ in changes)
    if moved and state.get("dataset") != dataset_identity(info):
        raise HpcdlError(
            f"--resume: data.path now names other data ({cfg.data.path}: {dataset_identity(info)}; the run was "
            f"trained on {state.get('dataset') or 'a dataset this checkpoint does not describe'}); the saved "
            "position counts samples of that dataset: resume with it, or start a new run.dir"
        )
    position = RunState.from_checkpoint(state)
    for name, old, new in changes:
        notes.append(f"resuming with {name} changed: {old!r} -> {new!r}")
    old_batch = saved_cfg.get("train", {}).get("batch_size", cfg.train.batch_size)
    if old_batch != cfg.train.batch_size and position.step_in_epoch:
        position.step_in_epoch = converted_step(position, old_batch, cfg)
    return position


def converted_step(position: RunState, old_batch: int, cfg: Config) -> int:
    """The step within the epoch that starts at the same sample under the new batch size, or a refusal."""
    new_batch, samples = cfg.train.batch_size, position.step_in_epoch * old_batch
    # Both orders are cut from one sequence that does not depend on the batch size.
    if cfg.data.partition in ("global", "chunked") and samples % new_batch == 0:
        return samples // new_batch
    raise HpcdlError(
        f"--resume: train.batch_size changed {old_batch} -> {new_batch} in the middle of epoch {position.epoch + 1} "
        f"(after {samples} samples, which {new_batch}-sample batches do not reach exactly"
        + ("" if cfg.data.partition in ("global", "chunked") else f" with data.partition = {cfg.data.partition!r}")
        + f"); resume with train.batch_size = {old_batch} until the epoch ends, or one that divides {samples}"
    )


def claim_run_folder(cfg: Config, setup: Setup) -> rundir.RunLock:
    """Rank 0, once every check passed: move an old run aside, create and lock the folder, check every path."""
    run_dir = Path(cfg.run.dir)
    if setup.move_aside:
        rundir.move_aside(run_dir, setup.move_aside)
    created = [path for path in (run_dir, *run_dir.parents) if not path.exists()]  # what mkdir makes, deepest first
    setup.created = created
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = rundir.RunLock(run_dir)
        lock.acquire()
        check_writable(run_dir)
        slots = OPTIMIZER_SLOTS[cfg.train.optimizer]
        checkpoint.check_space(run_dir, checkpoint.estimate_bytes(setup.model.state_dict(), slots))
        rundir.write_config(run_dir, cfg.to_dict())
        return lock
    except OSError as exc:
        _remove_new_folders(run_dir, created)
        raise HpcdlError(f"run.dir {run_dir}: {exc.strerror or exc} ({exc.filename or run_dir})") from None
    except HpcdlError:
        _remove_new_folders(run_dir, created)
        raise


def undo_fresh_run(cfg: Config, setup: Setup) -> None:
    """Rank 0, after a fresh run failed before its first checkpoint: the run folder as it was before it (nothing
    partial, and the corrected rerun is not refused); an old run that --overwrite moved aside is moved back.
    A run with a checkpoint stays: `--resume auto` continues it."""
    run_dir = Path(cfg.run.dir)
    if setup.resume_state is not None or checkpoint.list_checkpoints(run_dir) or _has_epoch_records(run_dir):
        return
    folder = checkpoint.checkpoint_dir(run_dir)
    for path in (
        *(run_dir / name for name in rundir.RUN_OUTPUTS),
        folder / checkpoint.MANIFEST,
        run_dir / rundir.CONFIG,
    ):
        _remove(path)
    _remove_new_folders(run_dir, setup.created)
    if not setup.created:  # the folder was there: only what this run wrote goes, its lock file last
        for path in (folder, run_dir / rundir.LOCK):
            _remove(path)
    if setup.move_aside and not run_dir.exists():
        rundir.move_aside(setup.move_aside, run_dir)


def _has_epoch_records(run_dir: Path) -> bool:
    """Whether the run logged a whole epoch: its records are worth keeping (`--resume auto` moves them aside)."""
    try:
        return '"event": "epoch"' in (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return False


def _remove(path: Path) -> None:
    """A file or a folder with what it holds; best effort (the failure being cleaned up is the one to report)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_writable(run_dir: Path) -> None:
    """Every path the run writes can be written: the folder, checkpoints/ and metrics.jsonl."""
    folder = checkpoint.checkpoint_dir(run_dir)
    folder.mkdir(exist_ok=True)
    for target in (folder, run_dir):
        if not os.access(target, os.W_OK | os.X_OK):
            raise HpcdlError(
                f"{target} is not writable: checkpoints and logs cannot be written; choose another run.dir"
            )
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and not os.access(metrics, os.W_OK):
        raise HpcdlError(f"{metrics} is not writable; choose another run.dir")


def _remove_new_folders(run_dir: Path, created: list[Path]) -> None:
    """Undo the folders this run created (run.dir and any parents it lacked) before it failed: no partial output.

    Best effort: the error that brought us here is the one to report, never one of the clean-up's own.
    """
    if not created:  # run.dir was there before: what it holds is not ours to remove
        return
    for path in (run_dir / rundir.LOCK, run_dir / rundir.CONFIG, checkpoint.checkpoint_dir(run_dir), *created):
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass
