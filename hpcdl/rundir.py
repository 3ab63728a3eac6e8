"""A run folder belongs to one run: one live run holds it, a fresh start never buries a run, and a
resume says what changed since the run began.

- **Lock.** Rank 0 holds an `fcntl` lock on `<run.dir>/.lock` for the whole run; the kernel
  releases it when the process ends, however it ends, so a killed run never leaves a stale
  lock. A second run on the folder ends at once, naming the holder (host, pid, start time).
- **Fresh start.** A folder that already holds a run (checkpoints, or the logs of one killed before
  its first checkpoint) is refused unless the run resumes (`--resume auto`) or `--overwrite` moves
  the old run aside (never deletes it); `--resume auto` over logs alone moves them aside too.
  The temporary file of a write an ended run left unfinished (`.NAME.partial`) is no run: the next
  run that claims the folder removes it.
- **Config.** The resolved config is written as `config.toml` at start; on resume it is compared:
  changes that keep the saved position meaningful are allowed and said, others are refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from hpcdl.checkpoint import BEST, checkpoint_dir, list_checkpoints
from hpcdl.errors import HpcdlError

LOCK = ".lock"
CONFIG = "config.toml"
# What a run writes as it trains, beside checkpoints: a folder holding any of these holds a run.
RUN_OUTPUTS = ("metrics.jsonl", "metrics.csv", "summary.json", "model.pt", "tensorboard")
# Keys whose change keeps a saved position meaningful: how long to train, how fast to learn, what to log;
# data.path only when the file holds the same dataset (checked against the checkpoint's record, hpcdl.preflight).
FREE_TO_CHANGE = {
    # train.init only says where a fresh start's weights come from: a resume continues from its checkpoint.
    "train": {"epochs", "max_steps", "lr", "momentum", "weight_decay", "clip_grad_norm", "init"},
    "run": {"progress", "timing_skip_steps", "log_every", "watchdog_s", "check_every", "checkpoint_every", "keep",
            "nan_policy", "dir", "early_stop", "keep_best", "tensorboard"},
    "data": {"cache_mb", "prefetch", "scan", "path"},
    "parallel": {"bucket_mb", "overlap", "compression", "accumulate_steps", "micro_batches", "schedule", "balance",
                 "cuts", "stages", "replicas", "tensor", "mode", "local_steps", "post_local_steps",
                 "average_optimizer", "servers", "max_staleness", "deterministic", "zero_stage"},
    # The masks live in the weights (hpcdl.compress.prune): a new ramp continues from them; older runs have none.
    "prune": {"final_sparsity", "start", "end", "every"},
}  # fmt: skip
# A batch size change moves every later step's samples: allowed only where the position converts exactly.
BATCH_KEY = ("train", "batch_size")


class RunLock:
    """The exclusive lock of one run folder, held by this process until it exits (or `release`)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self, record: bool = True) -> None:
        """Take the lock, or raise HpcdlError naming the run that holds it.

        `record`: this run claims the folder: it is written as the holder, and the temporary files an ended run's
        interrupted writes left there are removed (the lock proves that no live run is writing them).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise HpcdlError(
                f"run.dir {self.path.parent} is in use by another run ({holder}); wait for it to end, "
                "or choose another run.dir"
            ) from None
        self.fd = fd
        if record:
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
            try:
                remove_stale_partials(self.path.parent)
            except HpcdlError:
                self.release()
                raise

    def release(self) -> None:
        """Give the lock back (the kernel does it anyway when the process ends)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"host {holder['host']}, pid {holder['pid']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def check_free(run_dir: Path) -> None:
    """Raise HpcdlError naming the holder when a live run holds `run_dir` (no lock is kept)."""
    if not (Path(run_dir) / LOCK).exists():
        return
    probe = RunLock(run_dir)
    probe.acquire(record=False)  # a look, not a claim: the file keeps the last holder's record
    probe.release()


def check_fresh_start(run_dir: Path, overwrite: bool, auto: bool = False) -> Path | None:
    """A fresh start may not bury a run (its checkpoints, or its logs: a new run would append to them): refuse
    the folder, or (`overwrite`) say where the old run moves.

    `auto` (--resume auto found no checkpoint): what the folder holds is an earlier start that ended before its
    first checkpoint (logs, a best.pt); a requeued job must start over, so it moves aside as with `overwrite`.
    Temporary files of an ended run's interrupted writes (`.NAME.partial`) are no run: the next run removes them.
    Returns the folder the old run will be moved to, or None when there is nothing to move.
    """
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    saved = [path.name for path in found] + ([BEST] if (checkpoint_dir(run_dir) / BEST).exists() else [])
    logs = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not saved and not logs:
        return None
    if overwrite or auto:
        return aside_name(run_dir)
    if found:
        raise HpcdlError(
            f"run.dir {run_dir} already holds a run ({len(found)} checkpoint(s), newest {found[-1].name}); "
            "continue it with --resume auto, choose a new run.dir, or pass --overwrite to move it aside"
        )
    raise HpcdlError(
        f"run.dir {run_dir} already holds a run that ended before its first checkpoint ({', '.join(saved + logs)}); "
        "a new run would append to its logs: choose a new run.dir, or pass --overwrite (or --resume auto) "
        "to move it aside and start over"
    )


def aside_name(folder: Path) -> Path:
    """Where `move_aside` puts a folder that a new one replaces: beside it, named for the time."""
    return folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")


def move_aside(run_dir: Path, target: Path) -> None:
    """Rename the old run's folder to `target` (nothing is deleted but its stale temporary files)."""
    check_free(run_dir)  # no live run writes there: its unfinished writes are garbage, not kept
    remove_stale_partials(run_dir)
    shutil.move(str(run_dir), str(target))


def remove_stale_partials(run_dir: Path) -> None:
    """Delete the temporary files of writes that an ended run left unfinished (`.NAME.partial`, in the run folder and
    its checkpoints): they hold nothing usable and may be as large as a checkpoint. Call only once the folder's
    lock shows that no live run writes there."""
    for folder in (Path(run_dir), checkpoint_dir(run_dir)):
        for path in folder.glob(".*.partial") if folder.is_dir() else ():
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise HpcdlError(
                    f"cannot remove {path}, left by an interrupted write: {exc.strerror or exc}; remove it"
                ) from None


def write_config(run_dir: Path, tree: dict[str, dict[str, Any]]) -> None:
    """The resolved config as TOML, for the record and for the next resume's comparison."""
    (Path(run_dir) / CONFIG).write_text(to_toml(tree))


def to_toml(tree: dict[str, dict[str, Any]]) -> str:
    """A two-level dict of plain values (the config's shape) as TOML."""
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def config_changes(saved: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """("section.key", saved value, new value) for every key that differs."""
    return [
        (f"{section}.{key}", saved.get(section, {}).get(key), value)
        for section, values in new.items()
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ]


def refused_changes(changes: list[tuple[str, Any, Any]]) -> list[str]:
    """The changed keys that alter what the saved position means (the batch size is judged on its own)."""
    refused = []
    for name, _, _ in changes:
        section, key = name.split(".", 1)
        if key not in FREE_TO_CHANGE.get(section, set()) and (section, key) != BATCH_KEY:
            refused.append(name)
    return refused
