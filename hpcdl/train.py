"""The one training loop: epochs, steps, the sync point, evaluation, logging, checkpoints. Strategy-agnostic.

`preflight.prepare` checks everything on every rank before the first collective that depends on it;
`set_up` then builds the loop's collaborators (a `Loop`) and `run` drives them: `train_epochs`, `train_epoch`,
and `take_step`, the body of one step. The loop knows the work's split only through `Strategy`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from hpcdl import checkpoint
from hpcdl.comm import World
from hpcdl.compress.prune import Pruner
from hpcdl.config import Config, TrainConfig
from hpcdl.data.loader import Batch, Loader
from hpcdl.data.loaders import make_loaders
from hpcdl.device import device_summary, placement, to_cpu
from hpcdl.errors import HpcdlError, TrialFailed
from hpcdl.faults import Injector
from hpcdl.metrics import CsvLog, JsonlLog, StepClock, TensorBoardLog, run_summary, strict_json
from hpcdl.parallel import make_strategy
from hpcdl.parallel.loss import LossFn, Objective
from hpcdl.parallel.strategy import StepResult, Strategy
from hpcdl.precision import LossScaler
from hpcdl.preflight import RunState, Setup, dataset_identity, prepare, undo_fresh_run
from hpcdl.progress import Progress
from hpcdl.resilience import StepGuard, Verdict
from hpcdl.schedule import make_scheduler
from hpcdl.stopping import BestEpoch
from hpcdl.watchdog import Watchdog

Scheduler = torch.optim.lr_scheduler.LRScheduler
T = TypeVar("T")


@dataclass
class UserParts:
    """What hpcdl.fit may hand the loop beside the config: the user's loss, optimizer, schedule and callbacks.

    `optimizer(params)` returns a torch optimizer over the parameters this rank optimises (a split
    model's part); `scheduler(optimizer)` a torch LR scheduler, stepped once per optimizer step; each
    callback may define `on_step_end(record)` (every run.log_every steps) and `on_epoch_end(record)`.
    """

    loss_fn: LossFn | None = None
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None
    scheduler: Callable[[torch.optim.Optimizer], Scheduler] | None = None
    callbacks: Sequence[Any] = ()

    def call(self, hook: str, record: dict[str, Any]) -> None:
        """Run every callback's `hook` with the record (a copy each, so none sees another's changes)."""
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(dict(record))


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named in the config."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(strategy: Strategy, loader: Loader, watchdog: Watchdog) -> np.ndarray:
    """This rank's sums of the validation loss and the task's figures over its share of the split."""
    objective = strategy.objective
    sums = np.zeros(objective.width)
    for batch in loader.epoch(0):
        sums += strategy.evaluate_batch(batch).vector(objective.width)
        watchdog.progress()
    return sums


def optimizer_steps(cfg: Config, steps_per_epoch: int) -> int:
    """How many optimizer steps the whole run takes (the horizon of the learning-rate schedule)."""
    per_epoch = math.ceil(steps_per_epoch / cfg.parallel.accumulate_steps)
    total = cfg.train.epochs * per_epoch
    return min(total, cfg.train.max_steps // cfg.parallel.accumulate_steps) if cfg.train.max_steps else total


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
    overwrite: bool = False,
    parts: UserParts | None = None,
) -> dict[str, Any]:
    """Train as the config says (or `model`, a user's own network, and `parts`, their loss, optimizer, schedule
    and callbacks); returns the final summary (the same on every rank).

    A run stopped by SIGTERM/SIGUSR1/SIGINT checkpoints and returns {"stopped_by": signal name, ...} instead;
    a resumed run that is already complete returns {"complete": True, ...} without training.
    `overwrite` moves an old run in run.dir aside instead of refusing to start over it.
    """
    parts = parts or UserParts()
    setup = prepare(cfg, world, resume, model, overwrite, parts.loss_fn)
    try:
        return run(cfg, world, setup, faults, parts)
    except (Exception, SystemExit) as exc:  # an agreed failure exits; a contained trial's folder is the sweep's
        if world.is_root and not isinstance(exc, TrialFailed):
            undo_fresh_run(cfg, setup)
        raise
    finally:
        if setup.lock is not None:
            setup.lock.release()


@dataclass
class Loop:
    """The training loop's collaborators, built once by `set_up`; `watch` adds the watchdog and the checkpoints it
    watches just before the first step."""

    cfg: Config
    world: World
    setup: Setup
    strategy: Strategy
    train_loader: Loader
    val_loader: Loader
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    state: RunState
    best: BestEpoch
    scaler: LossScaler
    faults: Injector
    guard: StepGuard
    log: JsonlLog
    steps_log: StepLog
    clock: StepClock
    last_step: int  # the global step the run ends at
    pruner: Pruner | None
    watchdog: Watchdog = field(init=False)
    saving: Saving = field(init=False)

    def watch(self) -> None:
        """Start the watchdog (a collective: every rank builds it at this point of the run) and the checkpoints."""
        self.watchdog = Watchdog(self.world, self.cfg.run.watchdog_s, self.clock.timer)
        self.saving = Saving(
            self.cfg, self.world, self.strategy, self.optimizer, self.scheduler, self.state,
            dataset_identity(self.setup.info), self.best, self.scaler, self.watchdog, self.faults,
        )  # fmt: skip


def set_up(cfg: Config, world: World, setup: Setup, faults: Injector | None, parts: UserParts) -> Loop:
    """The loop's collaborators at the position `setup` holds: the strategy, loaders, optimizer and schedule (restored
    on a resume), loss scale, step guard, logs and pruner."""
    saved = setup.resume_state
    strategy = make_strategy(
        cfg, setup.layout, world, setup.model, setup.info.feature_shape, setup.weights, setup.objective,
        setup.device,
    )  # fmt: skip
    train_loader, val_loader = make_loaders(cfg, world, setup.info, strategy.share, setup.device)
    steps_per_epoch = len(train_loader)
    optimizer = parts.optimizer(strategy.params) if parts.optimizer else build_optimizer(cfg.train, strategy.params)
    scheduler = build_scheduler(cfg, parts, optimizer, steps_per_epoch)
    restore(strategy, optimizer, scheduler, saved, cfg.parallel.accumulate_steps)
    state = setup.position
    best = BestEpoch.from_config(cfg.run, saved and saved.get("best"))
    scaler = LossScaler.for_precision(cfg.train.precision, saved and saved.get("loss_scale"))
    faults = faults or Injector([], world.rank, world.size)
    guard = StepGuard(world, strategy, cfg.run.nan_policy, cfg.run.check_every, cfg.data.path, scaler)
    log = open_log(cfg, world, setup, state)
    steps_log = StepLog(cfg, world, strategy.objective, log, parts)
    clock = StepClock(cfg.run.timing_skip_steps)
    last_step = cfg.train.max_steps or state.global_step + state.steps_left(cfg.train.epochs, steps_per_epoch)
    # [prune]: masks kept after each step; a ramp the run never reaches is refused on every rank.
    pruner, ramp = world.agree(lambda: Pruner.for_run(cfg.prune, strategy, state.global_step, last_step))
    if ramp:
        world.log(ramp)
    return Loop(
        cfg, world, setup, strategy, train_loader, val_loader, steps_per_epoch, optimizer, scheduler, state, best,
        scaler, faults, guard, log, steps_log, clock, last_step, pruner,
    )  # fmt: skip


def run(cfg: Config, world: World, setup: Setup, faults: Injector | None, parts: UserParts) -> dict[str, Any]:
    """The loop over epochs and steps, from the position `setup` holds, to the summary."""
    loop = set_up(cfg, world, setup, faults, parts)
    if loop.state.global_step >= loop.last_step:
        return already_complete(cfg, world, loop.state, loop.log)
    if world.is_root:  # an earlier leg's summary no longer describes the run: the new one is written at its end
        (Path(cfg.run.dir) / "summary.json").unlink(missing_ok=True)
    began = time.perf_counter()
    loop.watch()
    loop.guard.signals.install()
    try:
        history, stop_signal, stopped_early = train_epochs(loop)
        elapsed = time.perf_counter() - began
        loop.steps_log.events.close()
        path = loop.saving.save()
        if stop_signal:
            return stopped(loop, stop_signal, path)
        loop.guard.signals.uninstall()  # after the last checkpoint: a late stop signal still exits 75
        return finish(loop, summary_figures(loop, history, stopped_early), elapsed)
    except TrialFailed:  # a contained group's trial failed on every rank: end this run's threads, go on
        loop.steps_log.events.close()
        loop.guard.signals.uninstall()
        raise
    finally:  # the watchdog watches up to the last file written; its thread ends with the run, however it ends
        loop.watchdog.close()


def train_epochs(loop: Loop) -> tuple[dict[str, Any], str | None, bool]:
    """Epochs until the run's end, a stop signal or early stopping: (the last epoch's record, the stop signal,
    whether early stopping ended the run)."""
    state, history, stop_signal, stopped_early = loop.state, {}, None, False
    while state.epoch < loop.cfg.train.epochs and state.global_step < loop.last_step and not stopped_early:
        sums, stop_signal = train_epoch(loop)
        if stop_signal:
            break  # no evaluation: checkpoint and go
        history, stopped_early = end_epoch(loop, sums)
    return history, stop_signal, stopped_early


def train_epoch(loop: Loop) -> tuple[np.ndarray, str | None]:
    """The rest of the epoch's steps, up to the run's last or a stop signal: (this rank's sums of the loss and the
    task's figures over its applied steps, the stop signal)."""
    state, stop_signal = loop.state, None
    sums = np.zeros(loop.strategy.objective.width)
    bar = Progress(
        min(loop.steps_per_epoch - state.step_in_epoch, loop.last_step - state.global_step),
        desc=f"epoch {state.epoch + 1}/{loop.cfg.train.epochs}", enabled=loop.world.is_root and loop.cfg.run.progress,
    )  # fmt: skip
    with bar:
        loop.clock.restart()
        for batch in watched(loop.train_loader, state, loop.watchdog):
            stop_signal = take_step(loop, batch, sums, bar)
            if stop_signal or state.global_step >= loop.last_step:
                break
    return sums, stop_signal


def take_step(loop: Loop, batch: Batch, sums: np.ndarray, bar: Progress) -> str | None:
    """One batch: forward and backward; at a sync point the guard's verdict and the update; then the step's figures,
    injected faults, the replicas' check, watchdog, clock, step record, progress and checkpoint. Returns a stop
    signal received at the sync point, if any."""
    state, timer = loop.state, loop.clock.timer
    timer.add("data", batch.wait_s)
    sync, scale = accumulation_window(state.step_in_epoch, loop.steps_per_epoch, loop.cfg.parallel.accumulate_steps)
    result = rank_step(loop, batch, sync, scale * loop.scaler.scale)
    verdict, grad_norm, lr = Verdict(), None, loop.optimizer.param_groups[0]["lr"]
    if sync:
        verdict, grad_norm = sync_point(loop, batch, result)
    counted = result.vector(len(sums)) if verdict.apply else 0.0
    sums += counted
    loop.steps_log.sums += counted
    state.skipped_steps += 0 if verdict.apply else 1
    state.advance()
    loop.faults.step_end(state.global_step, loop.strategy.params)
    if sync:
        loop.guard.check_replicas(state.global_step)
    loop.watchdog.end()
    loop.clock.step_done(batch.global_count)
    if sync:
        loop.steps_log.step_end(state, loop.steps_per_epoch, lr, grad_norm)
    bar.postfix = f"loss={sums[0] / max(sums[-1], 1):.4f}"
    bar.update(1)
    every = loop.cfg.run.checkpoint_every
    if sync and every and state.global_step % every == 0:
        loop.saving.save()
    return verdict.stop_signal


def sync_point(loop: Loop, batch: Batch, result: StepResult) -> tuple[Verdict, float | None]:
    """The sync point: gradients are summed; one small Allreduce for stop requests and NaN/Inf, then the optimizer
    step it allows, the schedule and pruning. Returns the guard's verdict and the gradient norm (when known)."""
    step, timer = loop.state.global_step + 1, loop.clock.timer
    with timer.phase("comm"):
        verdict = loop.guard.after_sync(step, result.loss_sum, loop.state.skipped_steps, rows=batch.indices)
    with timer.phase("optimizer"):
        grad_norm = update(loop, verdict, loop.steps_log.due(step))
        loop.scheduler.step()  # the rate follows the position, a skipped step included
        if loop.pruner:
            loop.pruner.after_step(step)
    return verdict, grad_norm


def end_epoch(loop: Loop, sums: np.ndarray) -> tuple[dict[str, Any], bool]:
    """After an epoch's steps: evaluation, the epoch's record (logged, to metrics.csv and the callbacks), best.pt.
    Returns the record and whether early stopping ends the run here."""
    epoch = loop.state.end_epoch(loop.steps_per_epoch)
    with loop.watchdog.watching(f"evaluation after epoch {epoch:g}", per="batch"):
        loop.faults.evaluation(math.ceil(epoch))
        history = epoch_record(loop, sums, epoch)
    loop.log.write(event="epoch", **history)
    loop.steps_log.epoch(history)
    return history, watch_best(loop, history)


def stopped(loop: Loop, stop_signal: str, path: Path | None) -> dict[str, Any]:
    """A run stopped by a signal, checkpointed at `path`: said, logged, and returned instead of the summary."""
    step = loop.state.global_step
    message = f"hpcdl: stopped by {stop_signal} at step {step}; checkpoint {path}; resume with --resume auto"
    # The handlers stay: a further signal (Slurm and the launcher often both send one) says this, exits 75.
    loop.guard.signals.checkpointed(message if loop.world.is_root else "")
    loop.world.log(message)
    loop.log.write(event="stopped", signal=stop_signal, step=step, checkpoint=str(path))
    return {"stopped_by": stop_signal, "step": step, "checkpoint": str(path)}


def summary_figures(loop: Loop, history: dict[str, Any], stopped_early: bool) -> dict[str, Any]:
    """The last epoch's record with what else the summary reports: early stopping's best epoch, pruning, the loader
    (the loader's figures are a collective)."""
    best = loop.best
    early = {"stopped_early": True, "best_epoch": best.best_epoch, f"best_{best.metric}": best.best}
    pruned = loop.pruner.summary() if loop.pruner else {}
    return {**history, **(early if stopped_early else {}), **pruned, **loop.train_loader.summary(loop.world)}


def watched(loader: Loader, state: RunState, watchdog: Watchdog) -> Iterator[Batch]:
    """The rest of the epoch's batches, each step's watch armed before its batch is fetched: a read that never
    returns is a stuck step."""
    batches = loader.epoch(state.epoch, state.step_in_epoch)
    while True:
        watchdog.begin(state.global_step + 1)
        batch = next(batches, None)
        if batch is None:  # the epoch's end: no step was taken
            watchdog.disarm()
            return
        yield batch


def rank_step(loop: Loop, batch: Batch, sync: bool, scale: float) -> StepResult:
    """This rank's forward and backward (injected faults first). In a contained world (a sweep's group) a step
    that raises is said at the next sync point, where it ends the trial on every rank; meanwhile this rank
    stands in with no rows, so that its peers' collectives still complete."""
    strategy, timer, guard = loop.strategy, loop.clock.timer, loop.guard
    try:
        loop.faults.step_start(loop.state.global_step + 1, batch)
        return strategy.train_step(batch, timer, sync=sync, scale=scale)
    except Exception as exc:
        if not loop.world.contained:
            raise
        guard.failure = guard.failure or (str(exc) if isinstance(exc, HpcdlError) else f"{type(exc).__name__}: {exc}")
        strategy.zero_grad()
        empty = Batch(
            batch.x[:0],
            batch.y[:0],
            batch.global_count,
            indices=batch.indices[:0] if batch.indices is not None else None,
        )
        return strategy.train_step(empty, timer, sync=sync, scale=scale)


def watch_best(loop: Loop, history: dict[str, Any]) -> bool:
    """After an epoch: keep best.pt if it is the best so far; True when early stopping ends the run here."""
    best = loop.best
    if best.update(history) and loop.cfg.run.keep_best:
        loop.saving.save_best()
    if not best.should_stop:
        return False
    epoch = history["epoch"]
    loop.world.log(
        f"hpcdl: early stop after epoch {epoch:g}: {best.metric} has not improved for {best.patience} epochs "
        f"(best {best.best:.6g} at epoch {best.best_epoch:g})"
    )
    loop.log.write(event="early_stop", epoch=epoch, metric=best.metric, best=best.best, best_epoch=best.best_epoch)
    return True


def restore(strategy: Strategy, optimizer: torch.optim.Optimizer, scheduler: Scheduler, saved: dict | None,
            accumulate: int) -> None:  # fmt: skip
    """A resumed run's optimizer, layout-own state, schedule and RNG; replicas' optimizers made equal."""
    if saved:
        strategy.load_optimizer_state(optimizer, saved["optimizer"])
        strategy.load_local_state(optimizer, saved.get("local"))
        restore_scheduler(scheduler, saved, accumulate)
        checkpoint.restore_rng(saved.get("rng"))
    strategy.sync_optimizer(optimizer)


def update(loop: Loop, verdict: Verdict, measure: bool) -> float | None:
    """The optimizer step the guard allowed (loss scale undone, gradients clipped); gradients zeroed either way.
    Returns the gradient norm when clipped or `measure`d."""
    strategy, grad_norm = loop.strategy, None
    if verdict.apply:
        loop.scaler.unscale(strategy.params)
        grad_norm = clip_or_measure(loop.cfg, strategy, measure)
        strategy.optimizer_step(loop.optimizer, loop.clock.timer)
    strategy.zero_grad()
    return grad_norm


def clip_or_measure(cfg: Config, strategy: Strategy, wanted: bool) -> float | None:
    """Clip the gradients to train.clip_grad_norm (the norm before), or only measure the norm if `wanted`."""
    if cfg.train.clip_grad_norm:
        return strategy.clip_grad_norm(cfg.train.clip_grad_norm)
    return strategy.grad_norm() if wanted else None


def build_scheduler(cfg: Config, parts: UserParts, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    """The user's scheduler (hpcdl.fit), else train.schedule over the run's optimizer steps."""
    if parts.scheduler:
        return parts.scheduler(optimizer)
    return make_scheduler(cfg.train, optimizer, optimizer_steps(cfg, steps_per_epoch))


def restore_scheduler(scheduler: Scheduler, saved: dict[str, Any], accumulate: int) -> None:
    """The schedule's position from a checkpoint; an older checkpoint without one: from its step count."""
    if "scheduler" in saved:
        scheduler.load_state_dict(saved["scheduler"])
        return
    steps = int(saved.get("global_step", 0)) // accumulate
    if steps:  # the optimizer's state holds its lr already; only the position is set
        scheduler.last_epoch = steps


def already_complete(cfg: Config, world: World, state: RunState, log: JsonlLog) -> dict[str, Any]:
    """A resumed run with nothing left to train says so, instead of reporting "0 steps"."""
    world.log(
        f"hpcdl: the run in {cfg.run.dir} is already complete (epoch {state.epoch} of {cfg.train.epochs}, "
        f"step {state.global_step}{f' of max_steps {cfg.train.max_steps}' if cfg.train.max_steps else ''}); "
        "nothing to train: raise train.epochs or train.max_steps to continue it"
    )
    log.write(event="complete", step=state.global_step)
    return {"complete": True, "step": state.global_step}


def epoch_record(loop: Loop, sums: np.ndarray, epoch: float) -> dict[str, Any]:
    """The epoch's training figures and validation, summed over ranks in one Allreduce; printed by rank 0."""
    objective = loop.strategy.objective
    val_sums = evaluate(loop.strategy, loop.val_loader, loop.watchdog)
    loop.watchdog.arrive()  # this rank's part is done: the Allreduce waits for the others
    totals = loop.world.allreduce_sum(np.concatenate([sums, val_sums]))
    record = {
        "epoch": epoch,
        "step": loop.state.global_step,
        **objective.metrics(totals[: len(sums)]),
        **objective.metrics(totals[len(sums) :], prefix="val_"),
    }
    names = objective.metric_names()
    shown = lambda group: " ".join(f"{n}={record[n]:{'.3f' if n.endswith('acc') else '.4f'}}" for n in group)  # noqa: E731
    loop.world.log(f"epoch {epoch:g}  {shown(names[: len(names) // 2])}  {shown(names[len(names) // 2 :])}")
    return record


class StepLog:
    """Step records every run.log_every optimizer steps (log_every x accumulate_steps batches): the loss and
    metrics over those steps, lr, the gradient's norm and samples/s; metrics.csv and callbacks per epoch."""

    def __init__(self, cfg: Config, world: World, objective: Objective, log: JsonlLog, parts: UserParts):
        self.every, self.world, self.objective, self.log, self.parts = cfg.run.log_every, world, objective, log, parts
        self.accumulate = cfg.parallel.accumulate_steps
        self.sums = np.zeros(objective.width)
        run_dir = Path(cfg.run.dir)
        self.csv = CsvLog(run_dir / "metrics.csv" if world.is_root else None)
        self.events = TensorBoardLog(run_dir / "tensorboard" if world.is_root and cfg.run.tensorboard else None)
        self.began = time.perf_counter()

    def due(self, global_step: int) -> bool:
        """Whether the optimizer step that ends at batch `global_step` writes a record."""
        return bool(self.every) and global_step % (self.every * self.accumulate) == 0

    def step_end(self, state: RunState, steps_per_epoch: int, lr: float, grad_norm: float | None) -> None:
        """After an optimizer step: on a logged one, one small Allreduce of the figures and a record on rank 0."""
        if not self.due(state.global_step):
            return
        totals = self.world.allreduce_sum(self.sums)
        now = time.perf_counter()
        samples = float(totals[-1])  # counted over every rank
        record = {
            "step": state.global_step,
            "epoch": state.epoch + state.step_in_epoch / steps_per_epoch,
            **self.objective.metrics(totals),
            "lr": lr,  # the rate this step was taken with
            "grad_norm": grad_norm,
            "samples_per_s": samples / (now - self.began) if now > self.began else 0.0,
        }
        self.log.write(event="step", **record)
        self.events.write("step", record, state.global_step)
        self.parts.call("on_step_end", record)
        self.sums[:], self.began = 0.0, now

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record: to metrics.csv and the callbacks."""
        self.csv.write(record)
        self.events.write("epoch", record, record["step"])
        self.parts.call("on_epoch_end", record)


def open_log(cfg: Config, world: World, setup: Setup, state: RunState) -> JsonlLog:
    """Say what runs where, and open the metrics log (in the run folder rank 0 has claimed)."""
    run_dir = Path(cfg.run.dir)
    world.log(
        f"hpcdl: {world.size} ranks on {world.num_nodes} node(s), torch threads per rank: {torch.get_num_threads()}; "
        f"model {setup.model_name} "
        f"({sum(p.numel() for p in setup.model.parameters()):,} parameters); "
        f"data {cfg.data.path} ({setup.info.sizes['train']:,} train / {setup.info.sizes['val']:,} val, "
        f"partition {cfg.data.partition}); parallel.mode {setup.layout.mode}"
        + (f"; resumed at step {state.global_step}" if setup.resume_state else "")
    )
    where = placement(world, setup.device)
    if where:
        world.log(f"hpcdl: {where}")
    return JsonlLog(run_dir / "metrics.jsonl" if world.is_root else None)


@dataclass
class Saving:
    """Checkpoints: the unsplit model, optimizer, schedule, position, best epoch, loss scale, RNG (rank 0 writes)."""

    cfg: Config
    world: World
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    state: RunState
    dataset: dict[str, Any]
    best: BestEpoch
    scaler: LossScaler
    watchdog: Watchdog
    faults: Injector

    def contents(self) -> dict[str, Any]:
        """What a checkpoint holds (gathered on rank 0: a collective)."""
        return {
            "model": to_cpu(self.strategy.model_state()),
            "optimizer": to_cpu(self.strategy.optimizer_state(self.optimizer)),
            "local": to_cpu(self.strategy.local_state(self.optimizer)),
            "scheduler": self.scheduler.state_dict(),
            "best": self.best.to_checkpoint(),
            "loss_scale": self.scaler.to_checkpoint(),
            **self.state.to_checkpoint(),
            "world_size": self.world.size,
            "config": self.cfg.to_dict(),
            "source": self.cfg.source,
            "rng": checkpoint.rng_state(),
            "dataset": self.dataset,  # sizes, shape, classes: a resume from a moved file checks it is the same data
        }

    def save(self) -> Path | None:
        """A step-N.pt checkpoint; under agree: a save that fails on rank 0 (a full disk) ends every rank."""
        run, step = self.cfg.run, self.state.global_step
        return self._save(f"checkpoint at step {step}", lambda held: checkpoint.save(run.dir, step, held, run.keep))

    def save_best(self) -> Path | None:
        """checkpoints/best.pt: this epoch is the best so far."""
        run_dir = self.cfg.run.dir
        return self._save(f"best.pt at step {self.state.global_step}", lambda held: checkpoint.save_best(run_dir, held))

    def _save(self, what: str, write: Callable[[dict[str, Any]], Path]) -> Path | None:
        """Gather the contents and let rank 0 `write` them, watched as `what` (a stuck write ends the job)."""
        step = self.state.global_step
        with self.watchdog.watching(what):
            contents = self.contents()

            def part() -> Path | None:
                self.faults.checkpoint(step)
                return write(contents) if self.world.is_root else None

            return each_part(self.world, self.watchdog, part)


def each_part(world: World, watchdog: Watchdog, part: Callable[[], T]) -> T:
    """Every rank's `part` under agree (one that fails ends every rank), then each tells the watchdog it has
    arrived and waits for the others: a stuck part is named as its rank's."""

    def then_arrive() -> T:
        result = part()
        watchdog.arrive()
        return result

    return world.agree(then_arrive)


def finish(loop: Loop, history: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """The final weights as model.pt; the run's summary (the same on every rank), logged, written and printed."""
    cfg, world, strategy, state, watchdog = loop.cfg, loop.world, loop.strategy, loop.state, loop.watchdog
    # Watched to the summary's last collective: once rank 0 has written, every rank only waits for the others.
    with watchdog.watching(f"model.pt at step {state.global_step}"):
        weights = to_cpu(strategy.model_state())  # the unsplit model on rank 0 (a collective gather)
        each_part(world, watchdog, lambda: checkpoint.save_weights(cfg.run.dir, weights) if world.is_root else None)
        summary = run_summary(
            world, loop.clock, history, elapsed,
            global_batch=cfg.train.batch_size,
            timing_skip_steps=cfg.run.timing_skip_steps,
            params=sum(p.numel() for p in loop.setup.model.parameters()),  # the whole model, however split
            comm_bytes_per_step=strategy.bytes_per_sync / cfg.parallel.accumulate_steps,
            param_digest=checkpoint.parameter_digest(weights),
            skipped_steps=state.skipped_steps,
            **device_summary(world, loop.setup.device),
            **strategy.summary(),
        )  # fmt: skip
    loop.log.write(event="summary", **summary)
    summary_file = Path(cfg.run.dir) / "summary.json"
    world.agree(lambda: summary_file.write_text(strict_json(summary, indent=2) + "\n") if world.is_root else None)
    return summary
