"""The trials of a sweep: the cartesian grid of `--grid key=v1,v2`, or with `--random N` seeded draws from
each `--grid` range."""

from __future__ import annotations

import itertools
import math

import numpy as np

from hpcdl.errors import ConfigError

RANGES = ("log", "uniform", "int", "choice")  # with --random: --grid key=KIND:...


def split_values(text: str) -> list[str]:
    """Comma-separated values, commas inside [...] or {...} kept: "[16,32],[32,64]" -> ["[16,32]", "[32,64]"]."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return [v for v in values if v]


def parse_assignment(spec: str, flag: str) -> tuple[str, str]:
    """'section.key=values' -> (section.key, values); one line naming the flag when malformed."""
    key, sep, values = spec.partition("=")
    if not sep or "." not in key or not values.strip():
        raise ConfigError(f"{flag} {spec!r}: expected SECTION.KEY=VALUES, e.g. {flag} train.lr=1e-3,3e-3")
    return key.strip(), values.strip()


def grid(specs: list[str]) -> list[dict[str, str]]:
    """Every combination of the `--grid` values, the first key varying slowest; values as TOML literals."""
    axes = [parse_assignment(spec, "--grid") for spec in specs]
    keys = [key for key, _ in axes]
    choices = [split_values(values) for _, values in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def draw(kind_and_bounds: str, rng: np.random.Generator, key: str) -> str:
    """One value of a `--random` range, as a TOML literal."""
    kind, _, rest = kind_and_bounds.partition(":")
    if kind == "choice":
        return str(rng.choice(split_values(rest)))
    try:
        low, high = (float(v) for v in rest.split(":"))
    except ValueError:
        raise ConfigError(
            f"--grid {key}={kind_and_bounds}: expected KIND:LOW:HIGH (kinds {', '.join(RANGES)}), "
            "e.g. train.lr=log:1e-4:1e-1"
        ) from None
    if kind == "log":
        return f"{math.exp(rng.uniform(math.log(low), math.log(high))):.6g}"
    if kind == "uniform":
        return f"{rng.uniform(low, high):.6g}"
    if kind == "int":
        return str(int(rng.integers(int(low), int(high) + 1)))
    raise ConfigError(f"--grid {key}={kind_and_bounds}: unknown kind {kind!r} (kinds {', '.join(RANGES)})")


def random_trials(specs: list[str], count: int, seed: int) -> list[dict[str, str]]:
    """`count` draws from one generator seeded with `seed` (the same list every time): each `--grid` spec is a
    range (train.lr=log:1e-4:1e-1, uniform:A:B, int:A:B) or values to choose from (model.hidden=[16],[32])."""
    rng = np.random.default_rng(seed)
    ranges = []
    for spec in specs:
        key, values = parse_assignment(spec, "--grid")
        ranges.append((key, values if values.partition(":")[0] in RANGES else f"choice:{values}"))
    return [{key: draw(bounds, rng, key) for key, bounds in ranges} for _ in range(count)]
