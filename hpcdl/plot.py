"""`hpcdl plot RUN_DIR`: a run's metrics.jsonl as PNGs: loss.png, metrics.png, lr.png."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdl.errors import DataError, HpcdlError
from hpcdl.outputs import check_new_file

# Per-epoch metrics, each logged for training and as val_<name>: classification logs acc, regression the rest.
EPOCH_METRICS = ("acc", "rmse", "mae", "r2")


@dataclass
class Line:
    """One plotted series: a legend label and its points."""

    label: str
    xs: list[float]
    ys: list[float]


@dataclass
class Panel:
    """One set of axes of a figure and the lines drawn on it."""

    ylabel: str
    xlabel: str
    lines: list[Line]


def read_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The "step" and "epoch" records of a metrics.jsonl, by event; other events are left out."""
    try:
        text = path.read_text(errors="replace")  # bytes that are not UTF-8 make their line "not JSON" below
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    records: dict[str, list[dict[str, Any]]] = {"step": [], "epoch": []}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not JSON ({exc.msg}): fix or delete that line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object: fix or delete that line")
        if record.get("event") in records:
            records[record["event"]].append(record)
    return records


def _line(label: str, records: list[dict[str, Any]], x: str, y: str) -> Line:
    """The records' finite (x, y) points in x order; of records with the same x the last logged wins."""
    # A resumed run logs again the steps after its checkpoint: the newer figures replace the older.
    points = {r[x]: r[y] for r in records if _finite(r.get(x)) and _finite(r.get(y))}
    xs = sorted(points)
    return Line(label, xs, [points[v] for v in xs])


def _finite(value: Any) -> bool:
    """A real number to plot: not null, a flag, NaN or infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _panel(ylabel: str, xlabel: str, *lines: Line) -> Panel:
    """A panel of the lines that have points."""
    return Panel(ylabel, xlabel, [line for line in lines if line.xs])


def figures(records: dict[str, list[dict[str, Any]]]) -> dict[str, list[Panel]]:
    """File name -> the panels of each figure that has something to show."""
    steps, epochs = records["step"], records["epoch"]
    loss = _panel(
        "loss",
        "step",
        _line("train (per logged step)", steps, "step", "loss"),
        _line("train (epoch mean)", epochs, "step", "loss"),
        _line("val", epochs, "step", "val_loss"),
    )
    metrics = [
        _panel(name, "epoch", _line("train", epochs, "epoch", name), _line("val", epochs, "epoch", f"val_{name}"))
        for name in EPOCH_METRICS
    ]
    lr = _panel("learning rate", "step", _line("lr", steps, "step", "lr"))
    candidates = {"loss.png": [loss], "metrics.png": metrics, "lr.png": [lr]}
    return {name: kept for name, panels in candidates.items() if (kept := [panel for panel in panels if panel.lines])}


def _draw(plt: Any, panels: list[Panel]) -> Any:
    """One figure, its panels side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(1 + 4 * len(panels), 3.4), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel.lines:
            # Few points (epochs) get markers; a dense series (steps) is a plain line.
            ax.plot(line.xs, line.ys, "o-" if len(line.xs) <= 50 else "-", markersize=4, label=line.label)
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _writable(out: Path) -> None:
    """Make the folder `out` if needed; a one-line error if it cannot be written to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HpcdlError(f"{out}: cannot make the folder ({exc.strerror}): choose another with --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise HpcdlError(f"{out}: folder not writable: choose another with --out")


def pyplot():
    """matplotlib's pyplot drawing to files only (the Agg backend: no display needed); ImportError without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write loss.png, metrics.png and lr.png (those with data) of a run folder into `out` (default: the run's);
    a PNG already there is replaced only with `overwrite`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        problem = "not a folder" if run_dir.exists() else "no such folder"
        raise HpcdlError(f"{run_dir}: {problem}: give the run folder of a training run (its run.dir)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl: not a run folder, or its run has not logged anything yet")
    shown = figures(read_records(path))
    if not shown:
        raise DataError(f"{path}: no epoch or step records to plot: let the run finish an epoch first")
    try:
        plt = pyplot()
    except ImportError:
        raise HpcdlError("hpcdl plot needs matplotlib: pip install 'hpcdl[plots]'") from None
    target = Path(out) if out is not None else run_dir
    for name in shown:
        check_new_file("--out", target / name, overwrite, make_parents=True)
    _writable(target)
    written = []
    for name, panels in shown.items():
        fig = _draw(plt, panels)
        try:
            fig.savefig(target / name)
        except OSError as exc:
            raise HpcdlError(f"{target / name}: cannot write ({exc.strerror}): choose another with --out") from None
        finally:
            plt.close(fig)
        written.append(target / name)
    return written
