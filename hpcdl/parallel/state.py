"""A split model's state, joined on rank 0 for checkpoints and cut again on resume: one way for every strategy.

A rank's part is keyed as in the unsplit model: its state_dict keys, and its optimizer
entries under the unsplit model's parameter indices (`global_ids`). Parts are joined
along an axis of the grid (pipeline stages hold disjoint keys; tensor and column ranks
hold the same keys, each a block along the dimension `dims` names). Checkpoints thus
hold the unsplit model and resume in any layout.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcdl.data.partition import block_range
from hpcdl.parallel.grid import Grid


def _join(values: list[Any], dim: int | None) -> Any:
    """One value from every part that has it: blocks joined along `dim`; anything else is the same everywhere."""
    if dim is not None and torch.is_tensor(values[0]) and values[0].dim() > dim:
        return torch.cat(values, dim)
    return values[0]


def join_parts(parts: list[dict], dims: dict) -> dict:
    """Key -> value over every part, in the parts' order; keys in `dims` joined along their dimension."""
    keys = list(dict.fromkeys(key for part in parts for key in part))
    return {key: _join([part[key] for part in parts if key in part], dims.get(key)) for key in keys}


def gather_model_state(grid: Grid, axis: str, own: dict[str, torch.Tensor], dims: dict[str, int]) -> dict:
    """The unsplit model's state on world rank 0 from every rank's part along `axis`; this rank's part elsewhere."""
    parts = grid.gather_on_root(axis, own)
    return own if parts is None else join_parts(parts, dims)


def gather_optimizer_state(grid: Grid, axis: str, own: dict, global_ids: list[int], dims: dict[int, int]) -> dict:
    """The optimizer's state keyed by the unsplit model's parameter indices, joined on world rank 0."""
    mine = keyed_optimizer_state(own, global_ids)
    parts = grid.gather_on_root(axis, mine)
    return mine if parts is None else join_optimizer_states(parts, dims)


def keyed_optimizer_state(own: dict, global_ids: list[int]) -> dict:
    """An optimizer's state_dict over a part of the model, keyed by the unsplit model's parameter indices."""
    return {
        "state": {global_ids[i]: entry for i, entry in own["state"].items()},
        "param_groups": [{**g, "params": [global_ids[i] for i in g["params"]]} for g in own["param_groups"]],
    }


def join_optimizer_states(parts: list[dict], dims: dict[int, int]) -> dict:
    """The unsplit optimizer's state from every part's keyed state (blocks of split parameters along `dims`)."""
    state = {}
    for gid in sorted({gid for part in parts for gid in part["state"]}):
        entries = [part["state"][gid] for part in parts if gid in part["state"]]
        state[gid] = {key: _join([e[key] for e in entries], dims.get(gid)) for key in entries[0]}
    groups = [dict(g) for g in parts[0]["param_groups"]]
    for j, group in enumerate(groups):
        group["params"] = sorted({gid for part in parts for gid in part["param_groups"][j]["params"]})
    return {"state": state, "param_groups": groups}


def local_optimizer_state(whole: dict, global_ids: list[int], dims: dict[int, int], index: int, parts: int) -> dict:
    """This rank's optimizer state cut from the unsplit one: its parameters' entries, block `index` of `parts`
    along each split parameter's dimension."""
    local = {gid: i for i, gid in enumerate(global_ids)}
    state = {}
    for gid, entry in whole["state"].items():
        if gid not in local:
            continue
        dim = dims.get(gid)
        state[local[gid]] = {
            key: value.narrow(dim, *_start_length(value.shape[dim], index, parts)).clone()
            if dim is not None and torch.is_tensor(value) and value.dim() > dim
            else value
            for key, value in entry.items()
        }
    groups = [{**g, "params": [local[gid] for gid in g["params"] if gid in local]} for g in whole["param_groups"]]
    return {"state": state, "param_groups": groups}


def _start_length(length: int, index: int, parts: int) -> tuple[int, int]:
    start, stop = block_range(length, index, parts)
    return start, stop - start
