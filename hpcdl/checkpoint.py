"""Checkpoints: atomic, checksummed, listed in a manifest, the newest K kept, world-size independent.

A run's `checkpoints/` folder holds `step-N.pt` files and `manifest.json`, which records
each file's size and SHA-256. A checkpoint is valid when it is in the manifest and its
bytes match; a corrupt or partial newest one is skipped (saying so) for the previous one.

Checkpoints are data, not code: every field is a tensor or plain Python data, and they are read
with `weights_only=True`, so a crafted file cannot run anything when loaded (nor does a plain
`torch.load(path)`). A save that fails (a full disk, a read-only or vanished filesystem) says so in
one line and leaves the folder as it was: no partial file, the previous checkpoints and manifest intact.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdl.errors import HpcdlError

CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
PARTIAL_NAME = re.compile(r"^\..+\.partial$")
MANIFEST = "manifest.json"
# What each manifest entry must hold to be used: verification reads them all.
MANIFEST_FIELDS = {"file": str, "step": int, "bytes": int, "sha256": str}
WEIGHTS = "model.pt"
ARCHIVE_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive: every checkpoint begins so
BEST = "best.pt"  # run.keep_best: the best epoch's checkpoint, beside the newest ones
# Room beyond the checkpoints themselves: the manifest, filesystem blocks, rounding of the estimate.
SPACE_MARGIN = 1 << 20
# What a checkpoint stores besides its tensors' bytes: config, RNG states, pickled names and zip records.
FIXED_OVERHEAD = 64 << 10
PER_TENSOR_OVERHEAD = 512
# Advice for the causes a save can meet, by errno; anything else falls back to the last line.
ADVICE = {
    errno.ENOSPC: "free space or move run.dir",
    errno.EDQUOT: "free space under your quota or move run.dir",
    errno.EROFS: "move run.dir to a writable filesystem",
    errno.EACCES: "make the folder writable or move run.dir",
    errno.EPERM: "make the folder writable or move run.dir",
}
DEFAULT_ADVICE = "check the filesystem holding run.dir"
# What to do when a run folder holds checkpoints but none is valid: for a command that reads one, and for a restart
# (--resume auto would find the same, and a fresh start refuses a folder that holds a run).
LOCATE_ADVICE = "give a checkpoint file, or a run folder holding a valid one"
RESTART_ADVICE = "start over without --resume and with --overwrite (the run is moved aside), or choose another run.dir"
RESUME_CHOICES = "give a checkpoint file, a run folder (its newest valid checkpoint), latest or auto"


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
    """File name -> {step, bytes, sha256, ...} from a checkpoint folder's manifest ({} if none).

    A manifest that is not JSON, or lacks a field an entry needs, is damaged: one line naming the file and the cause.
    """
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        return {entry["file"]: entry for entry in _checked_entries(json.loads(text))}
    except ValueError as exc:  # not JSON, or not a manifest's fields
        raise HpcdlError(
            f"{path} is damaged ({exc}); remove it, then name a checkpoint file to use that file unverified"
        ) from None


def _checked_entries(manifest: Any) -> list[dict[str, Any]]:
    """A manifest's entries, each holding every field of `MANIFEST_FIELDS` with its type; a ValueError names the first
    one missing or wrong."""
    entries = manifest.get("checkpoints") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise ValueError("no list of 'checkpoints'")
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"checkpoint entry {number} is {type(entry).__name__}, not an object")
        for name, kind in MANIFEST_FIELDS.items():
            if name not in entry:
                raise ValueError(f"checkpoint entry {number} has no {name!r}")
            if not isinstance(entry[name], kind) or isinstance(entry[name], bool):
                raise ValueError(f"checkpoint entry {number}'s {name!r} is {entry[name]!r}, not {kind.__name__}")
    return entries


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 10e9 else f"{nbytes / 1e6:.1f} MB"


def _free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it: its nearest existing folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _os_failure(action: str, path: Path, exc: OSError, nbytes: int = 0) -> HpcdlError:
    """One line for a failed file operation: the path, the cause, the figures of a full disk, what to do."""
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    figures = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and nbytes:
        figures = f" (need about {_size(nbytes)}, {_size(_free_bytes(path.parent))} free)"
    return HpcdlError(f"cannot {action} {path}: {cause}{figures}; {ADVICE.get(exc.errno, DEFAULT_ADVICE)}")


def write_atomically(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename, fsync of the folder: a reader sees all of it or none."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a failed write leaves nothing behind, its space given back
        raise
    # The rename is durable only once the folder entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_file(what: str, path: Path, data: bytes) -> None:
    """`write_atomically`, any OSError said in one line naming `path`."""
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise _os_failure(f"write {what}", path, exc, len(data)) from None


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_failure("create checkpoint folder", folder, exc) from None


def _manifest_entry(path: Path, step: int, data: bytes, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "file": path.name,
        "step": step,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "epoch": state.get("epoch"),
        "world_size": state.get("world_size"),
        "written": time.time(),
    }


def _remove_unlisted(folder: Path, listed: list[str]) -> None:
    """Delete checkpoints the manifest no longer lists (pruned, or left by an interrupted save) and stray partials."""
    for path in folder.iterdir():
        unlisted = CHECKPOINT_NAME.match(path.name) and path.name not in listed
        if unlisted or PARTIAL_NAME.match(path.name):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise _os_failure("remove old checkpoint", path, exc) from None


def save(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` as step-N.pt atomically, record its checksum in the manifest, keep the newest `keep`.

    A failure to write raises one HpcdlError line and leaves the previous checkpoints and manifest as they were.
    """
    folder = checkpoint_dir(run_dir)
    _make_folder(folder)
    entries = read_manifest(folder)  # before writing: a damaged manifest must not strand a new file
    final = folder / f"step-{step:08d}.pt"
    was_listed = final.name in entries
    data = _serialize(state)
    _write_file("checkpoint", final, data)
    entries[final.name] = _manifest_entry(final, step, data, state)
    kept = sorted(entries, key=lambda name: entries[name]["step"])[-keep:]
    manifest = {"format": 1, "checkpoints": [entries[name] for name in kept]}
    try:
        # The manifest goes after the file: a crash between them leaves the new file unlisted, so unused.
        _write_file("checkpoint manifest", folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    except HpcdlError:
        # The old manifest stands; an unlisted new file is only dead weight. One it lists (the same step saved
        # again) stays: removing it would leave the manifest naming a missing file, and its checksum tells.
        if not was_listed:
            final.unlink(missing_ok=True)
        raise
    # Old files go only once the manifest no longer lists them: it never names a missing file.
    _remove_unlisted(folder, kept)
    return final


def save_best(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` as checkpoints/best.pt (atomically): outside the rotation of step-N.pt, so never pruned."""
    folder = checkpoint_dir(run_dir)
    _make_folder(folder)
    path = folder / BEST
    _write_file("best checkpoint", path, _serialize(state))
    return path


def save_weights(run_dir: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write the unsplit model's parameters alone as `<run_dir>/model.pt` (atomically), for `torch.load`."""
    path = Path(run_dir) / WEIGHTS
    _write_file("model weights", path, _serialize(dict(state_dict)))
    return path


def estimate_bytes(model_state: Mapping[str, torch.Tensor], optimizer_slots: int = 2) -> int:
    """A checkpoint's size before one exists, for `check_space` ahead of the first step.

    The model's tensors once, plus `optimizer_slots` copies of the same size for the optimizer's state
    (2 for Adam/AdamW, 1 for SGD with momentum, 0 without), plus the fixed fields. Works on a model
    still on the meta device: only shapes and dtypes count.
    """
    tensor_bytes = sum(t.numel() * t.element_size() for t in model_state.values())
    tensors = len(model_state) * (1 + optimizer_slots)
    return tensor_bytes * (1 + optimizer_slots) + tensors * PER_TENSOR_OVERHEAD + FIXED_OVERHEAD


def check_space(run_dir: str | Path, nbytes: int) -> None:
    """Refuse a run whose filesystem cannot take its checkpoints (`nbytes` each, see `estimate_bytes`).

    Meant for the start of a run, so that a full disk stops it before its first step rather than at
    its first checkpoint hours later. A save writes the new file in full before the oldest one is
    removed, so this asks for twice `nbytes` free, plus a margin.
    """
    need = 2 * nbytes + SPACE_MARGIN
    free = _free_bytes(Path(run_dir))
    if free < need:
        raise HpcdlError(
            f"not enough free space for checkpoints in {run_dir}: each takes about {_size(nbytes)}, "
            f"{_size(need)} needed, {_size(free)} free; free space or move run.dir"
        )


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


def newest_valid(run_dir: str | Path, notes: list[str] | None = None, advice: str = LOCATE_ADVICE) -> Path | None:
    """The newest checkpoint whose bytes match the manifest; each one skipped is explained in `notes`, and when none
    is valid the error ends with `advice`."""
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
        raise HpcdlError(f"no valid checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(skipped) + f"; {advice}")
    return None


def resolve(resume: str, run_dir: str | Path, notes: list[str] | None = None) -> Path | None:
    """`latest` -> the newest valid checkpoint of `run_dir` (error if none); `auto` -> the same, or None if the run
    has no checkpoint yet; anything else a checkpoint file or a run folder (its newest valid one), as `locate`."""
    notes = [] if notes is None else notes
    if resume in ("latest", "auto"):
        path = newest_valid(run_dir, notes, RESTART_ADVICE)
        if path is None and resume == "latest":
            raise HpcdlError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}")
        return path
    if not Path(resume).exists():
        raise HpcdlError(f"--resume {resume}: no such checkpoint file or run folder; {RESUME_CHOICES}")
    return locate(resume, notes, f"--resume {resume}")


def locate(target: str, notes: list[str], where: str = "") -> Path:
    """A checkpoint file, or a run folder's newest valid checkpoint (each one skipped explained in `notes`);
    `where` starts each message (default `--checkpoint TARGET`: the option that named it)."""
    where = where or f"--checkpoint {target}"
    path = Path(target)
    if path.is_dir():
        found = newest_valid(path, notes)
        if found is None:
            raise HpcdlError(f"{where}: no checkpoint in {checkpoint_dir(path)}")
        return found
    if not path.is_file():
        raise HpcdlError(f"{where}: neither a checkpoint file nor a run folder")
    # best.pt is written atomically beside the rotation and never listed in the manifest.
    listed = path.name != BEST and (path.parent / MANIFEST).is_file()
    if listed and (reason := problem(path)):
        raise HpcdlError(f"{where}: checkpoint is not valid ({reason})")
    return path


def parameter_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's tensors in order: equal digests iff bitwise-equal parameters."""
    sha = hashlib.sha256()
    for name, tensor in state.items():
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _refusal(exc: pickle.UnpicklingError) -> str | None:
    """torch's reason for refusing an object under weights_only, shortened to its cause; None for other failures
    (torch asks to "file an issue" for a pickle it cannot parse at all: damage, not a refused object)."""
    text = str(exc)
    if not text.startswith("Weights only load failed") or "Please file an issue" in text:
        return None
    # After torch's standard preamble and numbered advice comes the line naming what it refused.
    for line in text.splitlines()[1:]:
        line = line.strip().removeprefix("WeightsUnpickler error: ")
        if line and not line.startswith(("(1)", "(2)", "Check the documentation")):
            return re.split(r" was not an allowed global|\. ", line)[0].rstrip(".")[:200]
    return "refused by torch's weights-only loader"


def _check_archive(path: str | Path) -> None:
    """A file that is not a PyTorch archive at all (text, random bytes, empty) is said to be no checkpoint before
    torch parses it, so that its own error text never reaches the user."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(ARCHIVE_MAGIC) + 12)
    except OSError as exc:
        raise HpcdlError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not head.startswith(ARCHIVE_MAGIC):
        what = f"not the zip archive torch.save writes: it begins {head!r}" if head else "an empty file"
        raise HpcdlError(f"{path} is not an hpcdl checkpoint ({what}); {LOCATE_ADVICE}")


def _unreadable(path: str | Path, exc: Exception) -> HpcdlError:
    """One line for a PyTorch archive torch cannot parse (truncated, overwritten in part)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
    cause = re.split(r"\.\s", first)[0][:300]  # torch goes on with advice after its first sentence
    return HpcdlError(f"checkpoint {path} cannot be read, damaged or truncated ({type(exc).__name__}: {cause})")


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save` as data only: tensors and plain values, nothing in it executed."""
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if (reason := _refusal(exc)) is None:
            raise _unreadable(path, exc) from None
        raise HpcdlError(
            f"{path} is not an hpcdl checkpoint (it holds objects other than tensors and plain data: {reason}); "
            "it was written by an older hpcdl or is not a checkpoint, and nothing in it was run"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other failure means an unreadable file
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or "model" not in state:
        raise HpcdlError(f"{path} is not an hpcdl checkpoint (no model state in it)")
    return state


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
    """Every random generator a step may use (torch, numpy, Python) as tensors and plain values, for a bitwise
    continuation that loads under weights_only."""
    return {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": _python_rng_state()}


def _numpy_rng_state() -> dict[str, Any]:
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "bit_generator": str(bit_generator),
        "key": torch.from_numpy(key.astype(np.int64)),  # uint32 words as int64: exact, and loadable everywhere
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def restore_rng(state: dict[str, Any] | None) -> None:
    """Put back the generators saved by `rng_state`, exactly (older checkpoints have none)."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    numpy_saved, python_saved = state["numpy"], state["python"]
    key = numpy_saved["key"].numpy().astype(np.uint32)
    gauss = numpy_saved["has_gauss"], numpy_saved["cached_gaussian"]
    np.random.set_state((numpy_saved["bit_generator"], key, numpy_saved["pos"], *gauss))
    random.setstate((python_saved["version"], tuple(python_saved["internal"].tolist()), python_saved["gauss_next"]))


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
