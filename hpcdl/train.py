"""The one training loop: epochs, steps, the sync point, evaluation, logging, checkpoints. Strategy-agnostic.

`preflight.prepare` checks everything on every rank before the first collective that depends on it;
`train` then runs the loop, which knows the work's split only through `Strategy`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdl import checkpoint
from hpcdl.comm import World
from hpcdl.config import Config, TrainConfig
from hpcdl.data.loader import Loader
from hpcdl.faults import Injector
from hpcdl.metrics import JsonlLog, StepClock, run_summary, strict_json
from hpcdl.parallel import make_strategy
from hpcdl.parallel.strategy import Strategy
from hpcdl.preflight import RunState, Setup, dataset_identity, make_loaders, prepare
from hpcdl.progress import Progress
from hpcdl.resilience import StepGuard, Verdict
from hpcdl.watchdog import Watchdog


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named in the config."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train as the config says (or `model`, a user's own network); returns the final summary (same on every rank).

    A run stopped by SIGTERM/SIGUSR1/SIGINT checkpoints and returns {"stopped_by": signal name, ...} instead;
    a resumed run that is already complete returns {"complete": True, ...} without training.
    `overwrite` moves an old run in run.dir aside instead of refusing to start over it.
    """
    setup = prepare(cfg, world, resume, model, overwrite)
    try:
        return run(cfg, world, setup, faults)
    finally:
        if setup.lock is not None:
            setup.lock.release()


def run(cfg: Config, world: World, setup: Setup, faults: Injector | None) -> dict[str, Any]:
    """The loop over epochs and steps, from the position `setup` holds, to the summary."""
    saved = setup.resume_state
    strategy = make_strategy(cfg, setup.layout, world, setup.model, setup.info.feature_shape, saved and saved["model"])
    train_loader, val_loader = make_loaders(cfg, world, setup.info, strategy.share)
    optimizer = build_optimizer(cfg.train, strategy.params)
    if saved:
        strategy.load_optimizer_state(optimizer, saved["optimizer"])
        checkpoint.restore_rng(saved.get("rng"))
    strategy.sync_optimizer(optimizer)
    state, dataset = setup.position, dataset_identity(setup.info)
    faults = faults or Injector([], world.rank, world.size)
    guard = StepGuard(world, strategy, cfg.run.nan_policy, cfg.run.check_every, data_path=cfg.data.path)
    log = open_log(cfg, world, setup, state)

    clock, steps_per_epoch = StepClock(cfg.run.warmup_steps), len(train_loader)
    last_step = cfg.train.max_steps or state.global_step + state.steps_left(cfg.train.epochs, steps_per_epoch)
    if state.global_step >= last_step:
        return already_complete(cfg, world, state, log)
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
                        step = state.global_step + 1
                        verdict = guard.after_sync(step, result.loss_sum, state.skipped_steps, rows=batch.indices)
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
                    save_run(cfg, world, strategy, optimizer, state, dataset)
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
    path = save_run(cfg, world, strategy, optimizer, state, dataset)
    guard.signals.uninstall()  # after the last checkpoint: a late stop signal still exits 75
    if stop_signal:
        world.log(
            f"hpcdl: stopped by {stop_signal} at step {state.global_step}; checkpoint {path}; resume with --resume auto"
        )
        log.write(event="stopped", signal=stop_signal, step=state.global_step, checkpoint=str(path))
        return {"stopped_by": stop_signal, "step": state.global_step, "checkpoint": str(path)}
    return finish(cfg, world, strategy, setup, state, clock, history, elapsed, log)


def already_complete(cfg: Config, world: World, state: RunState, log: JsonlLog) -> dict[str, Any]:
    """A resumed run with nothing left to train says so, instead of reporting "0 steps"."""
    world.log(
        f"hpcdl: the run in {cfg.run.dir} is already complete (epoch {state.epoch} of {cfg.train.epochs}, "
        f"step {state.global_step}{f' of max_steps {cfg.train.max_steps}' if cfg.train.max_steps else ''}); "
        "nothing to train: raise train.epochs or train.max_steps to continue it"
    )
    log.write(event="complete", step=state.global_step)
    return {"complete": True, "step": state.global_step}


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
    return JsonlLog(run_dir / "metrics.jsonl" if world.is_root else None)


def save_run(
    cfg: Config, world: World, strategy: Strategy, optimizer: torch.optim.Optimizer, state: RunState,
    dataset: dict[str, Any],
) -> Path | None:  # fmt: skip
    """A checkpoint of the unsplit model and optimizer, the run's position and RNG (gathered on, written by rank 0)."""
    contents = {
        "model": strategy.model_state(),
        "optimizer": strategy.optimizer_state(optimizer),
        **state.to_checkpoint(),
        "world_size": world.size,
        "config": cfg.to_dict(),
        "source": cfg.source,
        "rng": checkpoint.rng_state(),
        "dataset": dataset,  # sizes, shape, classes: a resume from a moved file checks it is the same data
    }
    # Under agree: a save that fails on rank 0 (a full disk) ends every rank with its one line, none left waiting.
    return world.agree(
        lambda: checkpoint.save(cfg.run.dir, state.global_step, contents, cfg.run.keep) if world.is_root else None
    )


def finish(
    cfg: Config, world: World, strategy: Strategy, setup: Setup, state: RunState, clock: StepClock,
    history: dict[str, Any], elapsed: float, log: JsonlLog,
) -> dict[str, Any]:  # fmt: skip
    """The final weights as model.pt; the run's summary (the same on every rank), logged, written and printed."""
    weights = strategy.model_state()  # the unsplit model on rank 0 (a collective gather)
    world.agree(lambda: checkpoint.save_weights(cfg.run.dir, weights) if world.is_root else None)
    summary = run_summary(
        world, clock, history, elapsed,
        global_batch=cfg.train.batch_size,
        warmup_steps=cfg.run.warmup_steps,
        params=sum(p.numel() for p in setup.model.parameters()),  # the whole model, however split
        comm_bytes_per_step=strategy.bytes_per_sync / cfg.parallel.accumulate_steps,
        param_digest=checkpoint.parameter_digest(weights),
        skipped_steps=state.skipped_steps,
    )  # fmt: skip
    log.write(event="summary", **summary)
    if world.is_root:
        (Path(cfg.run.dir) / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    return summary
