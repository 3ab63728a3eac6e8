"""The model to score with: rebuilt from a checkpoint's config and loaded with its unsplit state, or a user's module.

Every checkpoint hpcdl writes (data, pipeline, tensor, column runs) holds the unsplit model's state and the run's
config, so one rule serves them all: build the config's model for the data being scored, check that the saved
tensors fit it (naming a classes or sample-shape mismatch), load them, and run `preflight.check_output`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcdl import checkpoint, config
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.infer.inputs import ScoringInput
from hpcdl.models import build, is_meta, torch_dtype
from hpcdl.preflight import check_output


@dataclass
class ScoringModel:
    """A model ready to score a split: in eval mode, on the CPU, fed features in `dtype`."""

    module: nn.Module
    dtype: torch.dtype
    classes: int  # outputs per sample
    name: str  # for the start line
    source: str = ""  # the checkpoint it came from ("" for a user's module)


def run_config(state: dict[str, Any], path: Path) -> config.Config:
    """The config the checkpoint's run trained with; a factory's module is looked for next to its config file."""
    tree, source = state.get("config"), str(state.get("source") or "")
    if not isinstance(tree, dict) or not tree:
        raise HpcdlError(f"checkpoint {path} holds no config (written by an older hpcdl?): its model cannot be rebuilt")
    folder = str(Path(source).resolve().parent) if source and Path(source).is_file() else ""
    try:
        return config.from_dict(tree, source, folder)
    except ConfigError as exc:
        raise HpcdlError(f"checkpoint {path}: its config no longer loads ({exc})") from None


def output_classes(saved: dict[str, torch.Tensor]) -> int:
    """How many classes a saved model gives: the length of its last tensor (the classifier's bias)."""
    last = [t for t in saved.values() if torch.is_tensor(t) and t.ndim >= 1]
    return int(last[-1].shape[0]) if last else 0


def from_checkpoint(target: str, source: ScoringInput, notes: list[str]) -> ScoringModel:
    """The checkpoint's model rebuilt for `source`'s samples, its saved state loaded; a ConfigError if they differ."""
    path = checkpoint.locate(target, notes)
    state = checkpoint.load(path)
    cfg = run_config(state, path)
    saved, dtype = state["model"], torch_dtype(cfg.model.dtype)
    classes = source.num_classes or output_classes(saved)
    try:
        model = build(cfg.model, source.feature_shape, classes, cfg.train.seed, cfg.folder, "meta", dtype)
    except (ValueError, TypeError, RuntimeError, ConfigError) as exc:  # the model cannot take samples of this shape
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise shape_mismatch(path, state, source, f"it cannot be built for them: {cause}") from None
    check_fit(model, state, path, source, classes)
    if is_meta(model):
        model.to_empty(device="cpu")  # every tensor is loaded next: no initialisation needed
    checkpoint.restore_model(model, state, path)
    model.eval()
    check_output(model, source.as_info(classes), dtype)
    return ScoringModel(model, dtype, classes, cfg.model.factory or cfg.model.name, str(path))


def check_fit(model: nn.Module, state: dict[str, Any], path: Path, source: ScoringInput, classes: int) -> None:
    """The saved tensors have the shapes of the model built for this data, else what differs: classes or samples."""
    saved = state["model"]
    wanted = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    differs = [
        (name, tuple(saved[name].shape), shape)
        for name, shape in wanted.items()
        if name in saved and torch.is_tensor(saved[name]) and tuple(saved[name].shape) != shape
    ]
    if not differs:
        return  # missing or extra names are restore_model's to report
    if output_classes(saved) != classes:
        raise ConfigError(
            f"checkpoint {path} gives {output_classes(saved)} classes, but {source.path} /{source.split} has "
            f"{classes} (num_classes): score data with the classes the model was trained on"
        )
    name, had, want = differs[0]
    raise shape_mismatch(path, state, source, f"its {name} is {had}, samples of this shape need {want}")


def shape_mismatch(path: Path, state: dict[str, Any], source: ScoringInput, why: str) -> ConfigError:
    """One line for data whose samples the checkpoint's model does not take: its model and input shape, the data's."""
    model = (state.get("config") or {}).get("model", {})
    name = model.get("factory") or model.get("name") or "?"
    trained = state.get("dataset", {}).get("feature_shape")
    shape = f"samples of shape {tuple(trained)}" if trained else "samples of a shape it does not record"
    return ConfigError(
        f"checkpoint {path} holds a {name} model for {shape}, but {source.path} /{source.split} has samples of "
        f"shape {source.feature_shape} ({why}); score data shaped like the run's training data"
    )


def from_module(module: nn.Module, source: ScoringInput) -> ScoringModel:
    """A user's own module, checked against the split (it must give one output per class)."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"hpcdl.predict: model must be a torch.nn.Module or a checkpoint path, got {module!r}")
    floating = [p.dtype for p in module.parameters() if p.is_floating_point()]
    dtype = floating[0] if floating else torch.float32
    classes = source.num_classes or _probe_classes(module, source, dtype)
    check_output(module, source.as_info(classes), dtype)
    return ScoringModel(module, dtype, classes, type(module).__name__)


def _probe_classes(module: nn.Module, source: ScoringInput, dtype: torch.dtype) -> int:
    """The number of outputs a module gives for one sample (a features-only file without num_classes).

    0 when the module does not take the sample at all: `check_output` then says why, in its words.
    """
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *source.feature_shape, dtype=dtype))
    except (RuntimeError, ValueError, TypeError, IndexError):
        return 0
    return int(out.shape[-1]) if torch.is_tensor(out) and out.ndim == 2 else 0
