"""The one training loop: epochs, evaluation, logging, checkpoints. Strategy-agnostic."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdl import checkpoint
from hpcdl.comm import World
from hpcdl.config import Config, TrainConfig
from hpcdl.data.loader import Loader, SplitReader
from hpcdl.data.partition import Partition
from hpcdl.data.schema import DatasetInfo, validate
from hpcdl.errors import ConfigError, DataError
from hpcdl.faults import Injector
from hpcdl.metrics import PHASES, JsonlLog, PhaseTimer, resource_figures, slowest_rank_split
from hpcdl.models import build
from hpcdl.parallel import batch_ranks, make_strategy
from hpcdl.progress import Progress
from hpcdl.resilience import StepGuard, Verdict
from hpcdl.watchdog import Watchdog


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named in the config."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def check_scale(cfg: Config, info: DatasetInfo, ranks: int) -> None:
    """The checks that depend on the number of ranks, with what would work instead."""
    batch = cfg.train.batch_size
    if batch % ranks:
        lower = max(ranks, batch - batch % ranks)
        raise ConfigError(
            f"config: train.batch_size = {batch} is not divisible by the {ranks} ranks; "
            f"use a multiple of {ranks} (e.g. {lower})"
        )
    if info.sizes["train"] < batch:
        raise DataError(
            f"{info.path}: /train has {info.sizes['train']} samples, fewer than one global batch of "
            f"{batch} ({ranks} ranks x {batch // ranks}); lower train.batch_size or use more data"
        )


@dataclass
class Setup:
    """Everything a run needs, built and checked before the first collective."""

    info: DatasetInfo
    model: torch.nn.Module
    resume_state: dict[str, Any] | None


def prepare(cfg: Config, world: World, resume: str | None, model: torch.nn.Module | None = None) -> Setup:
    """Validate data, config and checkpoint on every rank; all fail together or none does.

    `model` is a user's own network (hpcdl.fit); otherwise the config's model is built.
    """
    info = world.agree(lambda: validate(cfg.data.path, scan=cfg.data.scan) if world.is_root else None)
    info = world.comm.bcast(info, root=0)
    notes: list[str] = []  # checkpoints skipped as corrupt, said aloud below

    def build_rank_parts() -> Setup:
        check_scale(cfg, info, batch_ranks(cfg, world.size))
        built = model
        if built is None:
            # A pipeline stage allocates only its own layers: the others stay shapes on the meta device.
            device = "meta" if cfg.parallel.mode == "pipeline" else "cpu"
            built = build(cfg.model, info.feature_shape, info.num_classes, cfg.train.seed, cfg.folder, device)
        path = checkpoint.resolve(resume, cfg.run.dir, notes) if resume else None
        state = checkpoint.load(path) if path else None
        if state:
            checkpoint.restore_model(built, state, path)
        return Setup(info, built, state)

    setup = world.agree(build_rank_parts)
    for note in notes:
        world.log(f"hpcdl: {note}")
    return setup


def make_loaders(
    cfg: Config, world: World, info: DatasetInfo, data_rank: int, data_size: int, columns: tuple[int, int] | None = None
) -> tuple[Loader, Loader]:
    """Train and validation loaders for this rank's share of every global batch (its `columns` only, if set)."""
    budget = cfg.data.cache_mb * 2**20
    train_part = Partition(
        info.sizes["train"],
        cfg.train.batch_size,
        data_rank,
        data_size,
        cfg.train.seed,
        cfg.data.partition,
        drop_last=cfg.data.drop_last,
    )
    val_part = Partition(info.sizes["val"], cfg.train.batch_size, data_rank, data_size, 0, shuffle=False)
    return world.agree(
        lambda: (
            Loader(
                SplitReader(cfg.data.path, "train", train_part.owned_range(), budget, columns),
                train_part,
                cfg.data.prefetch,
            ),
            Loader(
                SplitReader(cfg.data.path, "val", val_part.owned_range(), budget, columns), val_part, cfg.data.prefetch
            ),
        )
    )


def evaluate(strategy, loader: Loader, world: World) -> dict[str, float]:
    """Validation loss and accuracy over the whole split, summed over ranks."""
    sums = np.zeros(3)
    for batch in loader.epoch(0):
        sums += strategy.evaluate_batch(batch)
    loss, correct, count = world.allreduce_sum(sums)
    return {"val_loss": loss / max(count, 1), "val_acc": correct / max(count, 1)}


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
    state = setup.resume_state
    strategy = make_strategy(cfg, world, setup.model, setup.info.feature_shape, state["model"] if state else None)
    train_loader, val_loader = make_loaders(
        cfg, world, setup.info, strategy.data_rank, strategy.data_size, getattr(strategy, "columns", None)
    )
    optimizer = build_optimizer(cfg.train, strategy.params)
    if state:
        strategy.load_optimizer_state(optimizer, state["optimizer"])
    strategy.sync_optimizer(optimizer)
    epoch, step_in_epoch, global_step = (
        (state["epoch"], state["step_in_epoch"], state["global_step"]) if state else (0, 0, 0)
    )
    faults = faults or Injector([], world.rank, world.size)
    guard = StepGuard(world, strategy, cfg.run.nan_policy, cfg.run.check_every)
    if state:
        checkpoint.restore_rng(state.get("rng"))
        guard.skipped = state.get("skipped_steps", 0)

    run_dir = Path(cfg.run.dir)
    if world.is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(run_dir / "metrics.jsonl" if world.is_root else None)
    world.log(
        f"hpcdl: {world.size} ranks on {world.num_nodes} node(s), torch threads per rank: {torch.get_num_threads()}; "
        f"model {type(model).__name__ if model is not None else cfg.model.factory or cfg.model.name} "
        f"({sum(p.numel() for p in setup.model.parameters()):,} parameters); "
        f"data {cfg.data.path} ({setup.info.sizes['train']:,} train / {setup.info.sizes['val']:,} val, "
        f"partition {cfg.data.partition})" + (f"; resumed at step {global_step}" if state else "")
    )

    def save_checkpoint() -> Path | None:
        state = {
            "model": strategy.model_state(),
            "optimizer": strategy.optimizer_state(optimizer),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": world.size,
            "config": cfg.to_dict(),
            "source": cfg.source,
            "rng": checkpoint.rng_state(),
            "skipped_steps": guard.skipped,
        }
        return checkpoint.save(cfg.run.dir, global_step, state, cfg.run.keep) if world.is_root else None

    timer, steps_timed, samples_timed, step_s = PhaseTimer(), 0, 0, 0.0
    first_step = global_step
    steps_per_epoch = len(train_loader)
    accumulate = cfg.parallel.accumulate_steps
    last_step = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    began = time.perf_counter()
    history: dict[str, Any] = {}
    watchdog = Watchdog(world, cfg.run.watchdog_s, timer)
    guard.signals.install()
    stop_signal = None
    while epoch < cfg.train.epochs and global_step < last_step and not stop_signal:
        sums = np.zeros(3)
        epoch_steps = min(steps_per_epoch - step_in_epoch, last_step - global_step)
        bar = Progress(
            epoch_steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", enabled=world.is_root and cfg.run.progress
        )
        with bar:
            mark = time.perf_counter()
            for batch in train_loader.epoch(epoch, step_in_epoch):
                watchdog.begin(global_step + 1)
                faults.step_start(global_step + 1, batch)
                timer.add("data", batch.wait_s)
                # Gradient accumulation: communicate and step on the last batch of each window.
                window_start = step_in_epoch - step_in_epoch % accumulate
                window = min(accumulate, steps_per_epoch - window_start)
                sync = step_in_epoch + 1 == window_start + window
                stats = strategy.train_step(batch, timer, sync=sync, scale=1.0 / window)
                verdict = Verdict()
                if sync:
                    # One small Allreduce after the gradient sync: a stop request or NaN/Inf on any rank.
                    with timer.phase("comm"):
                        verdict = guard.after_sync(global_step + 1, stats[0])
                    with timer.phase("optimizer"):
                        if verdict.apply:
                            optimizer.step()
                        strategy.zero_grad()
                if verdict.apply:
                    sums += stats
                step_in_epoch += 1
                global_step += 1
                faults.step_end(global_step, strategy.params)
                if sync:
                    guard.check_replicas(global_step)
                watchdog.end()
                # Steps' wall time (not evaluation's); the first run.warmup_steps are not timed.
                now = time.perf_counter()
                if global_step - first_step > cfg.run.warmup_steps:
                    steps_timed, samples_timed = steps_timed + 1, samples_timed + batch.global_count
                    step_s += now - mark
                else:
                    timer.reset()
                mark = now
                bar.postfix = f"loss={sums[0] / max(sums[2], 1):.4f}"
                bar.update(1)
                if sync and cfg.run.checkpoint_every and global_step % cfg.run.checkpoint_every == 0:
                    save_checkpoint()
                if verdict.stop_signal:
                    stop_signal = verdict.stop_signal
                    break
                if global_step >= last_step:
                    break
        if stop_signal:
            break
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        loss_sum, correct, count = world.allreduce_sum(sums)
        history = {
            "epoch": epoch if step_in_epoch == 0 else epoch + step_in_epoch / steps_per_epoch,
            "step": global_step,
            "loss": loss_sum / max(count, 1),
            "acc": correct / max(count, 1),
            **evaluate(strategy, val_loader, world),
        }
        log.write(event="epoch", **history)
        world.log(
            f"epoch {history['epoch']:g}  loss={history['loss']:.4f} acc={history['acc']:.3f}  "
            f"val_loss={history['val_loss']:.4f} val_acc={history['val_acc']:.3f}"
        )
    elapsed = time.perf_counter() - began
    watchdog.close()
    guard.signals.uninstall()
    saved = save_checkpoint()
    if stop_signal:
        world.log(
            f"hpcdl: stopped by {stop_signal} at step {global_step}; checkpoint {saved}; resume with --resume auto"
        )
        log.write(event="stopped", signal=stop_signal, step=global_step, checkpoint=str(saved))
        return {"stopped_by": stop_signal, "step": global_step, "checkpoint": str(saved)}
    split = slowest_rank_split(world, timer, steps_timed)
    step_s = float(world.allreduce_max(np.array([step_s]))[0])  # a step waits for the slowest rank
    digests = world.comm.allgather(checkpoint.parameter_digest(strategy.model_state()))
    summary = {
        **history,
        "ranks": world.size,
        "threads_per_rank": torch.get_num_threads(),
        "steps": steps_timed,
        "warmup_steps": cfg.run.warmup_steps,
        "global_batch": cfg.train.batch_size,
        "params": sum(p.numel() for p in setup.model.parameters()),  # the whole model, however split
        "samples_per_s": samples_timed / step_s if step_s > 0 else 0.0,
        "elapsed_s": elapsed,
        "step_ms": 1000.0 * step_s / max(1, steps_timed),
        "ms_per_step": split,
        "comm_bytes_per_step": getattr(strategy, "bytes_per_sync", 0) / accumulate,
        **resource_figures(world, torch.get_num_threads()),
        "param_digests": digests,
        "skipped_steps": guard.skipped,
    }
    log.write(event="summary", **summary)
    if world.is_root:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    world.log(
        f"done: {steps_timed} steps in {elapsed:.1f} s, {summary['samples_per_s']:,.0f} samples/s; "
        "time per step (ms, slowest rank): " + "  ".join(f"{p} {split[p]:.2f}" for p in PHASES)
    )
    return summary
