"""Horovod's handles: a collective in flight, in two stages (agree on metadata, then move data), and its name.

`synchronize` waits for every stage and returns the result; `poll` advances without waiting. Data
collectives start in the order their agreements were issued, whatever order the handles are
synchronized in, so every rank starts them in the same order (MPI matches them in order). A name may
be in flight once at a time (Horovod's ValueError for a duplicate name).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpcdl.comm import Request
from hpcdl.horovod.errors import ArgumentError

_in_flight: set[str] = set()


@dataclass(eq=False)
class Handle:
    """A collective in flight; `finish` runs when `request` completes and returns the result or the next stage."""

    request: Request
    finish: Callable[[], Any]
    result: Any = None
    done: bool = False
    keep: list = field(default_factory=list)  # buffers MPI is still using
    name: str | None = None
    error: BaseException | None = None  # a disagreement, raised by synchronize


# Handles whose agreement is in flight, in the order it was issued.
_agreeing: deque[Handle] = deque()


def agreeing(handle: Handle) -> Handle:
    """Queue a handle in its agreement stage: its data stage starts after those of the handles issued before it."""
    _agreeing.append(handle)
    return handle


def named(name: str | None, start: Callable[[], Handle]) -> Handle:
    """start() under `name`; ArgumentError (a ValueError), before anything travels, while `name` is in flight."""
    if name is not None and name in _in_flight:
        raise ArgumentError(f"hpcdl.horovod: a collective named {name!r} is already in flight")
    handle = start()
    if name is not None:
        _in_flight.add(name)
        handle.name = name
    return handle


def _step(handle: Handle) -> None:
    """Its request has completed: run `finish`, which yields the next stage, the result or an error."""
    try:
        after = handle.finish()
    except Exception as error:  # a disagreement: every rank records it, and raises it at synchronize
        handle.error, handle.done, handle.keep = error, True, []
        _in_flight.discard(handle.name)
        return
    if isinstance(after, Handle):
        handle.request, handle.finish, handle.keep = after.request, after.finish, after.keep
    else:
        handle.result, handle.done, handle.keep = after, True, []
        _in_flight.discard(handle.name)


def _ready(handle: Handle, wait: bool) -> bool:
    if wait:
        handle.request.wait()
        return True
    return handle.request.test()


def _advance(handle: Handle, wait: bool) -> bool:
    """Run the stages whose requests have completed (waiting for each when `wait`); True when all have."""
    while handle in _agreeing:
        first = _agreeing[0]
        if not _ready(first, wait):
            return False
        _agreeing.popleft()
        _step(first)
    while not handle.done:
        if not _ready(handle, wait):
            return False
        _step(handle)
    return True


def poll(handle: Handle) -> bool:
    """True when the collective has finished (synchronize then returns at once)."""
    return _advance(handle, wait=False)


def synchronize(handle: Handle) -> Any:
    """Wait for an async collective and return its result; raises on every rank if the ranks disagreed on it."""
    _advance(handle, wait=True)
    if handle.error is not None:
        raise handle.error
    return handle.result
