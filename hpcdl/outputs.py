"""Output paths checked before the work: a file a command will write can be written, and an existing one is
replaced only when the user said so (`--overwrite`). A failure found after hours of work is a failure too late."""

from __future__ import annotations

import os
from pathlib import Path

from hpcdl.errors import HpcdlError


def nearest_existing(path: Path) -> Path:
    """`path` itself or the closest of its parents that exists (where a missing folder would be created)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def existing_output(option: str, path: Path, what: str, replace: str = "replace it") -> HpcdlError:
    """The one line refusing an output that exists (`what` says how): --overwrite, or another path."""
    return HpcdlError(f"{option} {path} {what}; pass --overwrite to {replace}, or choose another {option}")


def check_new_folder(option: str, folder: str | Path, named: Path | None = None) -> Path:
    """`folder`, named by `option`, is a folder or can be made one: the nearest path that exists is a folder a file
    can be created in (tried, not guessed from permission bits: root passes every `access` check, and /proc or a
    read-only mount still refuse). What it may already hold is the caller's to judge (`existing_output`).
    `named`: the path the message names (a file to be written in `folder`)."""
    folder = Path(folder)
    shown, nearest = named or folder, nearest_existing(folder)
    if not nearest.is_dir():
        raise HpcdlError(f"{option} {shown}: {nearest} is not a folder; choose another {option}")
    probe = nearest / f".hpcdl-probe-{os.getpid()}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise HpcdlError(
            f"{option} {shown}: cannot create a file in {nearest} ({exc.strerror or exc}); choose another {option}"
        ) from None
    return folder


def check_new_file(
    option: str, path: str | Path, overwrite: bool = False, suffixes: tuple[str, ...] = (), make_parents: bool = False
) -> Path:
    """`path`, named by `option` (e.g. "--json"), can be written as a new file before any work: one of `suffixes`
    when given, not a folder, its folder there (or creatable, where the writer makes it: `make_parents`) and
    writable, and no file there already unless `overwrite`."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise HpcdlError(f"{option} {path}: writes {' or '.join(suffixes)} files; give a name ending in one of them")
    if path.is_dir():
        raise HpcdlError(f"{option} {path} is a folder; give the path of the file to write")
    folder = path.parent
    if not make_parents and not folder.is_dir():
        what = "is not a folder" if nearest_existing(folder).is_file() else "does not exist"
        raise HpcdlError(f"{option} {path}: its folder {folder} {what}; create it or choose another {option}")
    check_new_folder(option, folder, path)
    if path.exists() and not overwrite:
        raise existing_output(option, path, "already exists")
    return path
