"""Checkpoints: atomic, world-size independent, the newest K kept."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from hpcdl.errors import HpcdlError

CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` as step-N.pt atomically (temporary file, fsync, rename), keep the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    partial = folder / f".{final.name}.partial"
    with partial.open("wb") as out:
        torch.save(state, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, final)
    # The rename is durable only once the folder entry is.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return final


def resolve(resume: str, run_dir: str | Path) -> Path:
    """`latest` -> the newest checkpoint of the run; anything else is a checkpoint's path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise HpcdlError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}")
        return found[-1]
    path = Path(resume)
    if not path.is_file():
        raise HpcdlError(f"--resume {resume}: no such checkpoint file")
    return path


def parameter_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's tensors in order: equal digests iff bitwise-equal parameters."""
    sha = hashlib.sha256()
    for name, tensor in state.items():
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise HpcdlError(f"checkpoint {path} cannot be read: {exc}") from None
