"""The scoring pass: checked set-up, every rank scoring its rows, results in sample order, metrics summed exactly.

Everything that can be wrong with the input (options, split, checkpoint, model vs data, the output's place) is
checked under `World.agree` before the first row is scored, so it ends every rank with one line and leaves no file.
A failure during the pass (a read or write error on some rank) lets every rank finish, then ends them all the same
way, the temporary output removed; only the unexpected goes through `comm.abort`.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcdl.comm import SharedCounters, World, init, thread_multiple
from hpcdl.config import NON_NEGATIVE, POSITIVE, check_choice, check_number, check_path
from hpcdl.data.loader import Batch, Loader
from hpcdl.errors import ConfigError, DataError, HpcdlError
from hpcdl.infer.inputs import ScoringInput, describe_split, open_reader
from hpcdl.infer.metrics import Tally, classification_metrics
from hpcdl.infer.model import ScoringModel, from_checkpoint, from_module
from hpcdl.infer.quantize import QUANTIZE, int8
from hpcdl.infer.schedule import ROWS_DONE, SCHEDULES, SLOTS, ClaimedChunks, static_plan
from hpcdl.infer.writer import OUTPUTS, GatheredRows, PredictionFile, check_destination, check_room, columns
from hpcdl.progress import Progress

POLL_S = 0.02  # how often rank 0 redraws the others' progress once its own rows are done


@dataclass(frozen=True)
class Request:
    """What to score and how: the options `infer`, `evaluate` and `predict` share."""

    data: str | Path
    split: str = "val"
    outputs: tuple[str, ...] = ("class",)
    schedule: str = "static"
    batch: int = 1024
    prefetch: int = 2
    progress: bool = True
    out: str | Path | None = None  # the results' HDF5 file; None: in memory on rank 0
    quantize: str = "none"  # int8: Linear/LSTM layers as dynamic int8 (hpcdl.infer.quantize)
    overwrite: bool = True  # replace an existing `out` (hpcdl.predict does; `hpcdl infer` only with --overwrite)

    def check(self) -> None:
        """A ConfigError naming the first option that is wrong."""
        check_path("--data", self.data)
        if self.out is not None:
            check_path("--out", self.out)
        if not isinstance(self.split, str) or not self.split:
            raise ConfigError(f"--split must name a split of the file (e.g. val), got {self.split!r}")
        for name in self.outputs:
            check_choice("--outputs", name, OUTPUTS)
        check_choice("--schedule", self.schedule, SCHEDULES)
        check_number("--batch", self.batch, POSITIVE, integer=True)
        check_number("prefetch", self.prefetch, NON_NEGATIVE, integer=True)
        check_choice("--quantize", self.quantize, QUANTIZE)


@dataclass
class Scored:
    """What a pass did: rows, time, rows each rank scored, metrics (labelled splits) and where the results are."""

    rows: int
    seconds: float
    rows_per_rank: list[int]
    metrics: dict[str, Any] | None = None
    out: Path | None = None
    arrays: dict[str, np.ndarray] | None = None  # rank 0, when the results stayed in memory

    @property
    def samples_per_s(self) -> float:
        """Rows scored per second over the whole pass (all ranks)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Job:
    """A checked pass, ready to run."""

    request: Request
    source: ScoringInput
    model: ScoringModel
    out: Path | None = None
    notes: list[str] = field(default_factory=list)


def prepare(world: World, request: Request, model: str | nn.Module, need_labels: bool = False) -> Job:
    """Check options, split, model and output place on every rank; all fail together, before any scoring."""

    def check_inputs() -> ScoringInput:
        request.check()
        source = describe_split(request.data, request.split)
        if need_labels and not source.labelled:
            raise DataError(f"{request.data}: split {request.split!r} has no labels (/{request.split}/y) to evaluate")
        if request.out is not None:  # before the model is loaded: a wrong output path costs no load
            check_destination(Path(request.out), request.data, request.overwrite)
        return source

    source = world.bcast(world.agree(lambda: check_inputs() if world.is_root else None), root=0)
    notes: list[str] = []
    scoring = world.agree(
        lambda: from_module(model, source) if isinstance(model, nn.Module) else from_checkpoint(model, source, notes)
    )
    if request.quantize == "int8":
        scoring = world.agree(lambda: int8(scoring))
    out = Path(request.out) if request.out is not None else None
    job = Job(request, source, scoring, out, notes)
    if out is not None:
        world.agree(lambda: check_room(out, _result_bytes(job)) if world.is_root else None)
    return job


def _shapes(job: Job) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    values = np.float64 if job.model.dtype == torch.float64 else np.float32
    return columns(job.request.outputs, job.model.classes, np.dtype(values))


def _result_bytes(job: Job) -> int:
    row = sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in _shapes(job).values())
    return row * job.source.rows


def run(world: World, job: Job) -> Scored:
    """Score the split on every rank and assemble the results: in `job.out`, else in memory on rank 0."""
    shapes = _shapes(job)
    sink: PredictionFile | GatheredRows
    if job.out is None:
        sink = GatheredRows(job.source.rows, shapes)
    else:
        attrs = {"data": str(job.request.data), "split": job.request.split, "model": job.model.source or job.model.name}
        lay_out = lambda: PredictionFile.lay_out(job.out, job.source.rows, shapes, attrs)  # noqa: E731
        offsets = world.bcast(world.agree(lambda: lay_out() if world.is_root else None), root=0)
        sink = PredictionFile(job.out, offsets, shapes)  # a failure to open it is kept, like a failed write
    scored, failure = score(world, job, sink)
    failure = failure or sink.close()
    failed = [error for error in world.allgather(failure) if error]
    if failed:  # every rank has finished: rank 0 removes the temporary output, then every rank ends
        if world.is_root:
            sink.discard()
        world.fail_all(failed[0])
    if isinstance(sink, PredictionFile):
        scored.out = world.agree(lambda: sink.complete(scored.metrics) if world.is_root else None)
    else:
        scored.arrays = sink.gather(world)
    return scored


def score(world: World, job: Job, sink: PredictionFile | GatheredRows) -> tuple[Scored, str | None]:
    """The pass: this rank's rows (a static block, or chunks claimed on demand) through the model, into `sink`.

    Returns what was scored, and this rank's failure (a read or write error), if any, for the caller to end
    every rank with once all have finished.
    """
    request, source = job.request, job.source
    block = static_plan(source.rows, request.batch, world.rank, world.size) if request.schedule == "static" else None
    owned = block.owned_range() if block is not None else (0, source.rows)  # dynamic: any row, any rank
    reader = world.agree(lambda: open_reader(source, owned))
    counters = SharedCounters(world, slots=SLOTS)
    if block is not None:
        plan, prefetch = block, request.prefetch
    else:
        plan = ClaimedChunks(counters, source.rows, request.batch)
        # Claimed chunks not yet scored are what a slow rank holds back. The prefetch thread claims them: MPI from
        # two threads, so without MPI_THREAD_MULTIPLE the loop claims and reads them itself.
        prefetch = min(request.prefetch, 1) if thread_multiple() else 0
    # Scoring reads each row once, in order: spans, no read-ahead hints (claimed chunks are not known ahead).
    loader = Loader(reader, plan, prefetch, job.model.dtype, read_ahead=0)
    tally = Tally(job.model.classes) if source.labelled else None
    bar = Progress(source.rows, desc=f"/{request.split}", unit="samples", enabled=world.is_root and request.progress)
    mine, failure = 0, None
    world.barrier()
    began = time.perf_counter()
    with bar, torch.inference_mode():
        try:
            for batch in [] if sink.error else loader.epoch(0):
                if not len(batch.indices):
                    continue
                sink.write(int(batch.indices[0]), score_batch(job.model.module, batch, tally, sink.shapes))
                mine += len(batch.indices)
                bar.update(counters.add(ROWS_DONE, len(batch.indices)) + len(batch.indices) - bar.count)
                if sink.error:
                    break  # this rank stops; the others score the rest, and the failure is said at the end
        except HpcdlError as exc:  # a read error, likewise
            failure = str(exc)
        finished = world.ibarrier()
        while not finished.test():  # rank 0 redraws the others' progress while it waits for them
            time.sleep(POLL_S)
            bar.update(counters.add(ROWS_DONE, 0) - bar.count)
    seconds = float(world.allreduce_max(np.array([time.perf_counter() - began]))[0])
    counters.close()
    reader.close()
    metrics = None
    if tally is not None:
        total = tally.summed(world)
        metrics = classification_metrics(total.confusion, total.loss_sum)
    rows_per_rank = world.allgather(mine)
    return Scored(source.rows, seconds, rows_per_rank, metrics), failure


def score_batch(model: nn.Module, batch: Batch, tally: Tally | None, wanted: Collection[str]) -> dict[str, np.ndarray]:
    """One batch's index and class, and probs and logits if `wanted` (float64 for a float64 model, else float32);
    counted into `tally` if the split is labelled."""
    logits = model(batch.x)
    values = logits.double() if logits.dtype == torch.float64 else logits.float()
    predicted = values.argmax(dim=1)
    if tally is not None:
        losses = F.cross_entropy(values, batch.y, reduction="none")
        tally.add(batch.y.numpy(), predicted.numpy(), float(losses.double().sum()))
    arrays = {"index": batch.indices, "class": predicted.numpy()}
    if "probs" in wanted:
        arrays["probs"] = torch.softmax(values, dim=1).numpy()
    if "logits" in wanted:
        arrays["logits"] = values.numpy()
    return arrays


def predict(
    model: nn.Module | str | Path,
    data: str | Path,
    split: str = "val",
    *,
    out: str | Path | None = None,
    outputs: tuple[str, ...] | list[str] | str = ("class",),
    schedule: str = "static",
    batch: int = 1024,
    progress: bool = False,
    world: World | None = None,
) -> Scored:
    """Score `split` of `data` on every rank with the engine of `hpcdl infer`; call it on every rank.

    `model` is a checkpoint file or run folder (its newest valid checkpoint), or your own module (rank 0's
    weights are broadcast; it scores in eval mode, its mode restored after). With `out`, the results go to that
    HDF5 file as `hpcdl infer` writes it (replacing one there); without, `arrays` holds them on rank 0 (index,
    class, and probs/logits if in `outputs`), in sample order. `metrics` (labelled splits) is the same on every rank.
    """
    from hpcdl.parallel.data import broadcast_module

    world = world or init()
    names = tuple(outputs.split(",") if isinstance(outputs, str) else outputs)
    request = Request(data, split, names, schedule, batch, progress=progress, out=out)
    if not isinstance(model, nn.Module):
        return run(world, prepare(world, request, str(model)))
    was_training = model.training
    model.eval()
    try:
        broadcast_module(world, model)
        return run(world, prepare(world, request, model))
    finally:
        model.train(was_training)
