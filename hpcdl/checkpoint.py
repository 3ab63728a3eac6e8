"""Checkpoints: atomic, checksummed, listed in a manifest, the newest K kept, world-size independent.

A run's `checkpoints/` folder holds `step-N.pt` files and `manifest.json`, which records
each file's size and SHA-256. A checkpoint is valid when it is in the manifest and its
bytes match; a corrupt or partial newest one is skipped (saying so) for the previous one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdl.errors import HpcdlError

CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's checkpoint files, oldest first (valid or not)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """File name -> {step, bytes, sha256, ...} from a checkpoint folder's manifest ({} if none)."""
    try:
        entries = json.loads((folder / MANIFEST).read_text())["checkpoints"]
        return {entry["file"]: entry for entry in entries}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as exc:
        raise HpcdlError(
            f"{folder / MANIFEST} is damaged ({exc}); remove it to use the checkpoints unverified"
        ) from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename, fsync of the folder: a reader sees all of it or none."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    # The rename is durable only once the folder entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` as step-N.pt atomically, record its checksum in the manifest, keep the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    final = folder / f"step-{step:08d}.pt"
    _write_atomically(final, data)
    entries = read_manifest(folder)
    entries[final.name] = {
        "file": final.name,
        "step": step,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "epoch": state.get("epoch"),
        "world_size": state.get("world_size"),
        "written": time.time(),
    }
    files = sorted(entries, key=lambda name: entries[name]["step"])
    for old in files[:-keep]:
        (folder / old).unlink(missing_ok=True)
        del entries[old]
    # The manifest goes last: a crash before it leaves the new file unlisted, so unused.
    manifest = {"format": 1, "checkpoints": [entries[name] for name in files[-keep:]]}
    _write_atomically(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    for stray in list_checkpoints(run_dir):
        if stray.name not in entries:  # unlisted leftovers of an interrupted save
            stray.unlink(missing_ok=True)
    return final


def problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be trusted (size or checksum against the manifest), or None."""
    entry = read_manifest(path.parent).get(path.name)
    if entry is None:
        return f"not listed in {path.parent / MANIFEST} (an interrupted save?)"
    if not path.is_file():
        return "file is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"truncated or extended: {size} bytes, the manifest says {entry['bytes']}"
    if _file_sha256(path) != entry["sha256"]:
        return "checksum mismatch (SHA-256 differs from the manifest)"
    return None


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def newest_valid(run_dir: str | Path, notes: list[str] | None = None) -> Path | None:
    """The newest checkpoint whose bytes match the manifest; each one skipped is explained in `notes`."""
    found = list_checkpoints(run_dir)
    skipped: list[str] = []
    for path in reversed(found):
        reason = problem(path)
        if reason is None:
            if skipped and notes is not None:
                notes.append(f"checkpoint {'; '.join(skipped)}; using the previous one, {path.name}")
            return path
        skipped.append(f"{path.name} is not valid ({reason})")
    if found:
        raise HpcdlError(
            f"no valid checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(skipped) + "; start without --resume"
        )
    return None


def resolve(resume: str, run_dir: str | Path, notes: list[str] | None = None) -> Path | None:
    """`latest` -> the newest valid checkpoint (error if none); `auto` -> the same, or None if the run has
    no checkpoint yet; anything else is a checkpoint's path, checked against its manifest."""
    if resume in ("latest", "auto"):
        path = newest_valid(run_dir, notes)
        if path is None and resume == "latest":
            raise HpcdlError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}")
        return path
    path = Path(resume)
    if not path.is_file():
        raise HpcdlError(f"--resume {resume}: no such checkpoint file")
    if (path.parent / MANIFEST).is_file() and (reason := problem(path)):
        raise HpcdlError(f"--resume {resume}: checkpoint is not valid ({reason})")
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


def restore_model(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's parameters into `model`, or say in one line why they do not fit.

    A meta-device model (a pipeline's, before each stage allocates its part) is only checked.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meta parameter.*no-op")
            model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).replace("\n", " ").replace("\t", "")
        raise HpcdlError(f"checkpoint {path} does not fit this model ({first[:300]}); check [model]") from None


def rng_state() -> dict[str, Any]:
    """Every random generator a step may use (torch, numpy, Python), for a bitwise continuation."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(state: dict[str, Any] | None) -> None:
    """Put back the generators saved by `rng_state` (older checkpoints have none)."""
    if state:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])


def info(target: str | Path) -> str:
    """What `hpcdl checkpoint info` prints for a checkpoint file or a run folder (its newest valid one)."""
    target = Path(target)
    notes: list[str] = []
    if target.is_dir():
        path = newest_valid(target, notes)
        if path is None:
            raise HpcdlError(f"{target}: no checkpoint in {checkpoint_dir(target)}")
    elif target.is_file():
        path = target
    else:
        raise HpcdlError(f"{target}: neither a checkpoint file nor a run folder")
    reason = problem(path) if (path.parent / MANIFEST).is_file() else "no manifest next to it"
    state = load(path)
    cfg = state.get("config", {})
    lines = [
        *notes,
        f"checkpoint   {path}",
        f"integrity    {'ok (size and SHA-256 match the manifest)' if reason is None else 'NOT VERIFIED: ' + reason}",
        f"step         {state.get('global_step')}",
        f"epoch        {state.get('epoch')} (step {state.get('step_in_epoch')} within it)",
        f"world size   {state.get('world_size')}",
        f"config       {state.get('source') or '?'}",
        *(f"  [{section}] {json.dumps(values, sort_keys=True)}" for section, values in cfg.items()),
        f"skipped      {state.get('skipped_steps', 0)} steps with non-finite loss or gradients",
        f"params       sha256:{parameter_digest(state['model'])}",
    ]
    return "\n".join(lines)
