"""Horovod's process sets as MPI sub-communicators: `hvd.add_process_set(ranks)` and `process_set=` arguments.

A set's members hold a sub-World (World.split) for barriers, objects and the gradient engine, and two
duplicates of it (World.dup): one for the metadata agreements, one for the tensor data. MPI matches
collectives per communicator, in order: an `*_async` collective left in flight must not meet a barrier
that one rank reaches first, and a joined rank serves agreements and data without knowing how the
active ranks interleave them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hpcdl.comm import World
from hpcdl.horovod.basics import current_world
from hpcdl.horovod.errors import ArgumentError, HorovodInternalError


class ProcessSet:
    """Ranks that run collectives among themselves; `hvd.global_process_set` is every rank."""

    def __init__(self, ranks: Sequence[int] | None = None):
        self.ranks = sorted(int(r) for r in ranks) if ranks is not None else None
        self.process_set_id: int | None = None
        self.world: World | None = None  # this rank's sub-world; None where this rank is not a member
        self.agreement: World | None = None  # the metadata agreements' World (a duplicate of `world`)
        self.data: World | None = None  # the tensor data's World (another duplicate)
        self.agreements = 0  # agreements this rank took part in: the same count on every member at each one

    def size(self) -> int:
        """Number of ranks in the set."""
        return len(self.ranks)

    def rank(self) -> int:
        """This rank's index in the set; -1 where it is not a member."""
        return self.world.rank if self.world is not None else -1

    def included(self) -> bool:
        """True where this rank is a member."""
        return self.world is not None

    def set_rank(self, global_rank: int) -> int:
        """The index in the set of a global rank (a root_rank argument); ArgumentError if not a member."""
        if global_rank not in self.ranks:
            raise ArgumentError(f"hpcdl.horovod: rank {global_rank} is not in the process set {self.ranks}")
        return self.ranks.index(global_rank)

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet()
global_process_set.process_set_id = 0
_ids = itertools.count(1)
_registered: dict[int, ProcessSet] = {}


def _attach(pset: ProcessSet, world: World) -> None:
    """Make this rank a member of `pset` on `world` (a collective over `world`)."""
    pset.world, pset.agreement, pset.data = world, world.dup(), world.dup()


def resolve(process_set: ProcessSet | None) -> ProcessSet:
    """The set a collective runs on (the global one for None); ArgumentError where this rank is not a member."""
    chosen = global_process_set if process_set is None else process_set
    if chosen is global_process_set and chosen.world is None:
        world = current_world()
        chosen.ranks = list(range(world.size))
        _attach(chosen, world)
    if not chosen.included():
        raise ArgumentError(f"hpcdl.horovod: this rank ({current_world().rank}) is not in {chosen}")
    return chosen


def gradient_world(process_set: ProcessSet | None) -> World:
    """The World a DistributedOptimizer averages over: its set's, or this rank alone where it is not a member."""
    chosen = global_process_set if process_set is None else process_set
    if chosen is not global_process_set and not chosen.included():
        return current_world().alone()
    return resolve(chosen).world


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Register a set on every rank (a collective: every rank calls it with the same ranks) and return it."""
    chosen = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    world = current_world()
    everyone = world.allgather(chosen.ranks)
    if any(ranks != everyone[0] for ranks in everyone):
        raise HorovodInternalError(f"hpcdl.horovod.add_process_set: ranks disagree on the set: {everyone}")
    if (
        not chosen.ranks
        or any(not 0 <= r < world.size for r in chosen.ranks)
        or len(set(chosen.ranks)) != len(chosen.ranks)
    ):
        raise ArgumentError(
            f"hpcdl.horovod.add_process_set: {chosen.ranks} must be distinct ranks in [0, {world.size})"
        )
    if any(s.ranks == chosen.ranks for s in _registered.values()):
        raise ArgumentError(f"hpcdl.horovod.add_process_set: a process set with ranks {chosen.ranks} exists already")
    member = world.rank in chosen.ranks
    sub = world.split(0 if member else 1)
    if member:
        _attach(chosen, sub)
    else:
        sub.free()
    chosen.process_set_id = next(_ids)
    _registered[chosen.process_set_id] = chosen
    return chosen


def remove_process_set(process_set: ProcessSet) -> bool:
    """Forget a set added by add_process_set and free its communicators; False if it was not registered."""
    if _registered.pop(process_set.process_set_id, None) is None:
        return False
    if process_set.world is not None:
        for world in (process_set.agreement, process_set.data, process_set.world):
            world.free()
    process_set.world = process_set.agreement = process_set.data = process_set.process_set_id = None
    return True
