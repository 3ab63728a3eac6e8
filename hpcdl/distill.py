"""Knowledge distillation (Hinton et al., 2015): a student learns from a teacher's softened outputs and the labels.

Per sample i, with the student's logits s_i, the teacher's t_i, the label y_i, temperature T and weight alpha:

    l_i = alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T)) + (1 - alpha) * CE(s_i, y_i)

where KL(p || q) = sum_c p_c (log p_c - log q_c) and CE is the cross-entropy at T = 1 (T^2 keeps the soft term's
gradients at the hard term's scale as T grows). Like every hpcdl loss it is a mean over samples: a rank's share of
a global batch of B rows is (sum over its rows of l_i) / B, so the gradients summed over ranks are the global
batch's mean gradient, the same at any rank count (`parallel/loss.py`).

The teacher's logits come from one of two sources, both giving the same t_i for the same sample:
- `online`: the teacher (a trained hpcdl run, loaded once per rank, eval mode, no gradients) scores the rank's rows;
- `precomputed`: the HDF5 file `hpcdl infer --split train --outputs logits` wrote, in sample order; the rows a batch
  holds are found by `Batch.indices`. A small file (up to `CACHE_BYTES`) is read whole once; a larger one is read
  per batch, one hyperslab per run of consecutive sorted indices, never loaded whole.

The validation loss stays the plain cross-entropy (the figures the student is judged by); the training loss logged
is l_i's mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcdl import checkpoint, config
from hpcdl.data.loader import Batch, contiguous_runs
from hpcdl.data.schema import DatasetInfo
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.models import build, is_meta, torch_dtype
from hpcdl.parallel.loss import Objective

CACHE_BYTES = 256 * 2**20  # precomputed logits up to this size are read whole, once per rank


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """The mean over samples of alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE."""
    student, teacher = student.float(), teacher.float()
    log_p = F.log_softmax(teacher / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    hard = F.cross_entropy(student, labels, reduction="none")
    return (alpha * temperature**2 * kl + (1.0 - alpha) * hard).mean()


class OnlineTeacher:
    """A trained model scoring each batch's rows as the student trains (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model.eval(), dtype
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        if next(self.model.parameters()).device != batch.x.device:  # the student's device (train.device), once
            self.model.to(batch.x.device)
        return self.model(batch.x.to(self.dtype)).float()


class PrecomputedLogits:
    """The teacher's logits of the train split, as `hpcdl infer --outputs logits` wrote them (rows in sample order)."""

    def __init__(self, path: str, rows: int, classes: int, cache_bytes: int = CACHE_BYTES):
        where = f"config: distill.logits = {path!r}"
        if not Path(path).is_file() or not h5py.is_hdf5(path):
            raise ConfigError(f"{where} is not an HDF5 file; write it with hpcdl infer --split train --outputs logits")
        self.file = h5py.File(path, "r")
        if "logits" not in self.file:
            raise ConfigError(f"{where} holds no /logits; write it with hpcdl infer --split train --outputs logits")
        self.dataset = self.file["logits"]
        split = self.file.attrs.get("split")
        if split is not None and str(split) != "train":
            raise ConfigError(f"{where} holds the {split!r} split's logits; the student trains on 'train'")
        if self.dataset.shape != (rows, classes):
            raise ConfigError(
                f"{where} has logits of shape {self.dataset.shape}, but the train split needs ({rows}, {classes})"
            )
        self.cache = self.dataset[...] if self.dataset.nbytes <= cache_bytes else None
        if self.cache is not None:
            self.file.close()

    def logits(self, batch: Batch) -> torch.Tensor:
        indices = batch.indices
        if indices is None:
            raise HpcdlError("distill.source = 'precomputed' needs each batch's sample indices (Batch.indices)")
        if self.cache is not None:
            return torch.from_numpy(self.cache[indices]).float().to(batch.x.device)
        order = np.argsort(indices, kind="stable")
        ordered = np.empty((len(indices), self.dataset.shape[1]), dtype=self.dataset.dtype)
        for start, stop, offset in contiguous_runs(np.asarray(indices)[order]):
            ordered[offset : offset + stop - start] = self.dataset[start:stop]
        out = np.empty_like(ordered)
        out[order] = ordered
        return torch.from_numpy(out).float().to(batch.x.device)


@dataclass(frozen=True, eq=False)
class DistillObjective(Objective):
    """Classification whose training loss is the distillation loss; evaluation stays the plain cross-entropy."""

    teacher: Any = field(default=None, repr=False)  # OnlineTeacher | PrecomputedLogits
    temperature: float = 2.0
    alpha: float = 0.5

    def share_of_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """This rank's part of the global batch's mean distillation loss: its rows' sum / global rows."""
        teacher = self.teacher.logits(batch)
        mean = distillation_loss(outputs, teacher, batch.y, self.temperature, self.alpha)
        return mean * (len(batch.y) / batch.global_count)


def load_teacher(target: str, info: DatasetInfo, notes: list[str]) -> tuple[nn.Module, torch.dtype]:
    """A trained run's model (a run folder's newest valid checkpoint, or a checkpoint file), for `info`'s samples."""
    where = f"config: distill.teacher = {target!r}"
    path = checkpoint.locate(target, notes, where)
    state = checkpoint.load(path)
    tree = state.get("config")
    if not isinstance(tree, dict) or not isinstance(state.get("model"), dict):
        raise ConfigError(f"{where}: {path} holds no model and config to rebuild the teacher from")
    teacher_cfg = config.from_dict(tree, str(state.get("source") or ""))
    saved = [t for t in state["model"].values() if torch.is_tensor(t) and t.ndim >= 1]
    classes = int(saved[-1].shape[0]) if saved else 0
    if classes != info.num_classes:
        raise ConfigError(f"{where} gives {classes} classes, but {info.path} has {info.num_classes}")
    dtype = torch_dtype(teacher_cfg.model.dtype)
    with torch.random.fork_rng():  # the build seeds torch: the student's random state stays as it was
        model = build(teacher_cfg.model, info.feature_shape, classes, teacher_cfg.train.seed, teacher_cfg.folder,
                      "meta", dtype)  # fmt: skip
    if is_meta(model):
        model.to_empty(device="cpu")
    checkpoint.restore_model(model, state, path)
    return model, dtype


def wrap(cfg: config.Config, info: DatasetInfo, objective: Objective, notes: list[str]) -> Objective:
    """The run's objective, made the distillation objective when [distill] is on (checked here, one-line errors)."""
    spec = cfg.distill
    if not spec.enabled:
        return objective
    if info.task != "classification":
        raise ConfigError(f"config: distill needs a classification task, but {info.path} is a {info.task} set")
    if objective.loss_fn is not F.cross_entropy:
        raise ConfigError("config: distill's hard-label term is the cross-entropy: leave train.loss unset")
    if spec.source == "online":
        teacher: Any = OnlineTeacher(*load_teacher(spec.teacher, info, notes))
    else:
        if spec.teacher:
            load_teacher(spec.teacher, info, notes)  # checked (classes, shapes), though the logits file is read
        teacher = PrecomputedLogits(spec.logits, info.sizes["train"], info.num_classes)
    whence = f"teacher {spec.teacher}" if spec.source == "online" else f"logits {spec.logits}"
    notes.append(f"distilling from the {whence} (T = {spec.temperature:g}, alpha = {spec.alpha:g})")
    return DistillObjective(
        objective.task, objective.loss_fn, objective.target_shape, teacher, spec.temperature, spec.alpha
    )
