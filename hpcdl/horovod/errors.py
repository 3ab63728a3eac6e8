"""Horovod's exception types, as hpcdl errors: code catching either Horovod's or hpcdl's kind catches them."""

from __future__ import annotations

from hpcdl.errors import HpcdlError


class HorovodInternalError(HpcdlError, RuntimeError):
    """Ranks disagree on a collective (shape, dtype, root, op): raised on every rank of the set, as Horovod does."""


class ArgumentError(HpcdlError, ValueError):
    """A bad argument found on this rank before anything travels (a duplicate name, bad splits, a scalar)."""


class NotOffered(HpcdlError, RuntimeError):
    """A Horovod feature hpcdl does not offer; the message names what to use instead."""
