"""The one training loop: epochs, steps, the sync point, evaluation, logging, checkpoints. Strategy-agnostic.

`prepare` checks everything on every rank before the first collective that depends on it;
`train` then runs the loop, which knows the work's split only through `Strategy`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdl import checkpoint
from hpcdl.comm import World
from hpcdl.config import Config, TrainConfig
from hpcdl.data.loader import Loader, SplitReader
from hpcdl.data.partition import DataShare, Partition
from hpcdl.data.schema import DatasetInfo, validate
from hpcdl.faults import Injector
from hpcdl.metrics import JsonlLog, StepClock, run_summary
from hpcdl.models import build, torch_dtype
from hpcdl.parallel import make_strategy
from hpcdl.parallel.layout import Layout
from hpcdl.parallel.strategy import Strategy
from hpcdl.progress import Progress
from hpcdl.resilience import StepGuard, Verdict
from hpcdl.watchdog import Watchdog


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
    def from_checkpoint(cls, state: dict[str, Any] | None) -> RunState:
        """The position saved in `state` (a fresh start without one)."""
        return cls(**{f.name: state.get(f.name, 0) for f in fields(cls)}) if state else cls()

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


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named in the config."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Setup:
    """Everything a run needs, built and checked before the first collective."""

    info: DatasetInfo
    layout: Layout
    model: torch.nn.Module
    resume_state: dict[str, Any] | None


def prepare(cfg: Config, world: World, resume: str | None, model: torch.nn.Module | None = None) -> Setup:
    """Validate data, layout, model and checkpoint on every rank; all fail together or none does.

    `model` is a user's own network (hpcdl.fit); otherwise the config's model is built.
    """
    info = world.agree(lambda: validate(cfg.data.path, scan=cfg.data.scan) if world.is_root else None)
    info = world.comm.bcast(info, root=0)
    notes: list[str] = list(cfg.notes)  # deprecated keys, checkpoints skipped as corrupt: said aloud below

    def build_rank_parts() -> Setup:
        layout = Layout.from_config(cfg, world.size)
        built = model
        if built is None:
            dtype = torch_dtype(cfg.model.dtype)
            seed, device = cfg.train.seed, layout.model_device
            built = build(cfg.model, info.feature_shape, info.num_classes, seed, cfg.folder, device, dtype)
        layout.check_model(built)
        layout.check_data(info)
        path = checkpoint.resolve(resume, cfg.run.dir, notes) if resume else None
        state = checkpoint.load(path) if path else None
        if state:
            checkpoint.restore_model(built, state, path)
        return Setup(info, layout, built, state)

    setup = world.agree(build_rank_parts)
    for note in notes:
        world.log(f"hpcdl: {note}")
    return setup


def make_loaders(cfg: Config, world: World, info: DatasetInfo, share: DataShare) -> tuple[Loader, Loader]:
    """Train and validation loaders for this rank's share of every global batch (its columns only, if set)."""
    budget, dtype = cfg.data.cache_mb * 2**20, torch_dtype(cfg.model.dtype)
    train_part = Partition(
        info.sizes["train"], cfg.train.batch_size, share.rank, share.size, cfg.train.seed, cfg.data.partition,
        drop_last=cfg.data.drop_last,
    )  # fmt: skip
    val_part = Partition(info.sizes["val"], cfg.train.batch_size, share.rank, share.size, 0, shuffle=False)

    def loader(split: str, part: Partition) -> Loader:
        reader = SplitReader(cfg.data.path, split, part.owned_range(), budget, share.columns)
        return Loader(reader, part, cfg.data.prefetch, dtype)

    return world.agree(lambda: (loader("train", train_part), loader("val", val_part)))


def evaluate(strategy: Strategy, loader: Loader, world: World) -> dict[str, float]:
    """Validation loss and accuracy over the whole split, summed over ranks."""
    sums = np.zeros(3)
    for batch in loader.epoch(0):
        sums += strategy.evaluate_batch(batch).vector()
    loss, correct, count = world.allreduce_sum(sums)
    return {"val_loss": loss / max(count, 1), "val_acc": correct / max(count, 1)}


def accumulation_window(step_in_epoch: int, steps_per_epoch: int, accumulate: int) -> tuple[bool, float]:
    """(communicate and step now?, loss scale): gradients of `accumulate` batches are summed, then one step."""
    window_start = step_in_epoch - step_in_epoch % accumulate
    window = min(accumulate, steps_per_epoch - window_start)
    return step_in_epoch + 1 == window_start + window, 1.0 / window


def train(
    cfg: Config,
    world: World,
    resume: str | None = None,
    model: torch.nn.Module | None = None,
    faults: Injector | None = None,
) -> dict[str, Any]:
    """Train as the config says (or `model`, a user's own network); returns the final summary (same on every rank).

    A run stopped by SIGTERM/SIGUSR1 checkpoints and returns {"stopped_by": signal name, ...} instead.
    """
    setup = prepare(cfg, world, resume, model)
    saved = setup.resume_state
    strategy = make_strategy(cfg, setup.layout, world, setup.model, setup.info.feature_shape, saved and saved["model"])
    train_loader, val_loader = make_loaders(cfg, world, setup.info, strategy.share)
    optimizer = build_optimizer(cfg.train, strategy.params)
    if saved:
        strategy.load_optimizer_state(optimizer, saved["optimizer"])
        checkpoint.restore_rng(saved.get("rng"))
    strategy.sync_optimizer(optimizer)
    state = RunState.from_checkpoint(saved)
    faults = faults or Injector([], world.rank, world.size)
    guard = StepGuard(world, strategy, cfg.run.nan_policy, cfg.run.check_every)
    log = open_log(cfg, world, setup, model, state)

    clock, steps_per_epoch = StepClock(cfg.run.warmup_steps), len(train_loader)
    last_step = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    began, history, stop_signal = time.perf_counter(), {}, None
    watchdog = Watchdog(world, cfg.run.watchdog_s, clock.timer)
    guard.signals.install()
    while state.epoch < cfg.train.epochs and state.global_step < last_step and not stop_signal:
        sums = np.zeros(3)
        bar = Progress(
            min(steps_per_epoch - state.step_in_epoch, last_step - state.global_step),
            desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}", enabled=world.is_root and cfg.run.progress,
        )  # fmt: skip
        with bar:
            clock.restart()
            for batch in train_loader.epoch(state.epoch, state.step_in_epoch):
                watchdog.begin(state.global_step + 1)
                faults.step_start(state.global_step + 1, batch)
                clock.timer.add("data", batch.wait_s)
                sync, scale = accumulation_window(state.step_in_epoch, steps_per_epoch, cfg.parallel.accumulate_steps)
                result = strategy.train_step(batch, clock.timer, sync=sync, scale=scale)
                verdict = Verdict()
                if sync:  # the sync point: gradients are summed; one small Allreduce for stop requests and NaN/Inf
                    with clock.timer.phase("comm"):
                        verdict = guard.after_sync(state.global_step + 1, result.loss_sum, state.skipped_steps)
                    with clock.timer.phase("optimizer"):
                        if verdict.apply:
                            optimizer.step()
                        strategy.zero_grad()
                sums += result.vector() if verdict.apply else 0.0
                state.skipped_steps += 0 if verdict.apply else 1
                state.advance()
                faults.step_end(state.global_step, strategy.params)
                if sync:
                    guard.check_replicas(state.global_step)
                watchdog.end()
                clock.step_done(batch.global_count)
                bar.postfix = f"loss={sums[0] / max(sums[2], 1):.4f}"
                bar.update(1)
                if sync and cfg.run.checkpoint_every and state.global_step % cfg.run.checkpoint_every == 0:
                    save_run(cfg, world, strategy, optimizer, state)
                stop_signal = verdict.stop_signal
                if stop_signal or state.global_step >= last_step:
                    break
        if stop_signal:
            break  # no evaluation: checkpoint and go
        epoch = state.end_epoch(steps_per_epoch)
        history = epoch_record(world, strategy, val_loader, sums, epoch, state.global_step)
        log.write(event="epoch", **history)
    elapsed = time.perf_counter() - began
    watchdog.close()
    guard.signals.uninstall()
    path = save_run(cfg, world, strategy, optimizer, state)
    if stop_signal:
        world.log(
            f"hpcdl: stopped by {stop_signal} at step {state.global_step}; checkpoint {path}; resume with --resume auto"
        )
        log.write(event="stopped", signal=stop_signal, step=state.global_step, checkpoint=str(path))
        return {"stopped_by": stop_signal, "step": state.global_step, "checkpoint": str(path)}
    return finish(cfg, world, strategy, setup, state, clock, history, elapsed, log)


def epoch_record(
    world: World, strategy: Strategy, val_loader: Loader, sums: np.ndarray, epoch: float, step: int
) -> dict[str, Any]:
    """The epoch's training figures summed over ranks, and validation; printed by rank 0."""
    loss_sum, correct, count = world.allreduce_sum(sums)
    record = {
        "epoch": epoch,
        "step": step,
        "loss": loss_sum / max(count, 1),
        "acc": correct / max(count, 1),
        **evaluate(strategy, val_loader, world),
    }
    world.log(
        f"epoch {epoch:g}  loss={record['loss']:.4f} acc={record['acc']:.3f}  "
        f"val_loss={record['val_loss']:.4f} val_acc={record['val_acc']:.3f}"
    )
    return record


def open_log(cfg: Config, world: World, setup: Setup, model: torch.nn.Module | None, state: RunState) -> JsonlLog:
    """Create the run folder (rank 0), say what runs where, and open the metrics log."""
    run_dir = Path(cfg.run.dir)
    if world.is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
    world.log(
        f"hpcdl: {world.size} ranks on {world.num_nodes} node(s), torch threads per rank: {torch.get_num_threads()}; "
        f"model {type(model).__name__ if model is not None else cfg.model.factory or cfg.model.name} "
        f"({sum(p.numel() for p in setup.model.parameters()):,} parameters); "
        f"data {cfg.data.path} ({setup.info.sizes['train']:,} train / {setup.info.sizes['val']:,} val, "
        f"partition {cfg.data.partition}); parallel.mode {setup.layout.mode}"
        + (f"; resumed at step {state.global_step}" if setup.resume_state else "")
    )
    return JsonlLog(run_dir / "metrics.jsonl" if world.is_root else None)


def save_run(
    cfg: Config, world: World, strategy: Strategy, optimizer: torch.optim.Optimizer, state: RunState
) -> Path | None:
    """A checkpoint of the unsplit model and optimizer, the run's position and RNG (gathered on, written by rank 0)."""
    contents = {
        "model": strategy.model_state(),
        "optimizer": strategy.optimizer_state(optimizer),
        **state.to_checkpoint(),
        "world_size": world.size,
        "config": cfg.to_dict(),
        "source": cfg.source,
        "rng": checkpoint.rng_state(),
    }
    return checkpoint.save(cfg.run.dir, state.global_step, contents, cfg.run.keep) if world.is_root else None


def finish(
    cfg: Config, world: World, strategy: Strategy, setup: Setup, state: RunState, clock: StepClock,
    history: dict[str, Any], elapsed: float, log: JsonlLog,
) -> dict[str, Any]:  # fmt: skip
    """The run's summary (the same on every rank), logged, written to summary.json and printed by rank 0."""
    summary = run_summary(
        world, clock, history, elapsed,
        global_batch=cfg.train.batch_size,
        warmup_steps=cfg.run.warmup_steps,
        params=sum(p.numel() for p in setup.model.parameters()),  # the whole model, however split
        comm_bytes_per_step=strategy.bytes_per_sync / cfg.parallel.accumulate_steps,
        param_digest=checkpoint.parameter_digest(strategy.model_state()),
        skipped_steps=state.skipped_steps,
    )  # fmt: skip
    log.write(event="summary", **summary)
    if world.is_root:
        (Path(cfg.run.dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
