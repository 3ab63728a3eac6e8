"""Classification metrics summed exactly over ranks: counts first (confusion matrix, loss sum), ratios last.

Every rank counts its rows into a confusion matrix (rows: true class, columns: predicted class) and a float64 sum
of per-sample cross-entropy; one Allreduce of those counts gives the whole split's, from which loss, accuracy and
per-class precision, recall and F1 follow, never averages of per-rank averages. A ratio with nothing to count
(precision of a class never predicted, recall of a class absent from the split) is 0, as scikit-learn reports it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl.checkpoint import write_atomically
from hpcdl.comm import World
from hpcdl.errors import HpcdlError
from hpcdl.metrics import strict_json

REPORT_FILES = ("metrics.json", "confusion.csv", "confusion.png")  # what `report_files` may give


class Tally:
    """One rank's counts: confusion matrix and summed loss of the rows it scored."""

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.confusion = np.zeros((classes, classes), dtype=np.int64)
        self.loss_sum = 0.0

    def add(self, labels: np.ndarray, predicted: np.ndarray, loss_sum: float) -> None:
        """Count a batch: its labels, predicted classes and summed per-sample loss."""
        pairs = labels.astype(np.int64) * self.classes + predicted.astype(np.int64)
        self.confusion += np.bincount(pairs, minlength=self.classes**2).reshape(self.classes, self.classes)
        self.loss_sum += loss_sum

    def summed(self, world: World) -> Tally:
        """The counts of every rank added together (exact: integers, and one float64 sum)."""
        total = Tally(self.classes)
        total.confusion = world.allreduce_sum(self.confusion)
        total.loss_sum = float(world.allreduce_sum(np.array([self.loss_sum]))[0])
        return total


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    return np.divide(top, bottom, out=np.zeros(len(top)), where=bottom > 0)


def classification_metrics(confusion: np.ndarray, loss_sum: float) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall/F1/support, their macro averages and the confusion matrix."""
    samples = int(confusion.sum())
    hits = np.diag(confusion).astype(np.float64)
    precision = _ratio(hits, confusion.sum(axis=0))
    recall = _ratio(hits, confusion.sum(axis=1))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "samples": samples,
        "loss": loss_sum / samples if samples else float("nan"),
        "accuracy": float(hits.sum() / samples) if samples else float("nan"),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": confusion.sum(axis=1).tolist(),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "confusion": confusion.tolist(),
    }


def table(metrics: dict[str, Any]) -> str:
    """The per-class figures as lines to print, with the totals first."""
    lines = [
        f"loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}  "
        f"({metrics['samples']:,} samples)",
        f"{'class':>5}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}",
    ]
    rows = zip(metrics["precision"], metrics["recall"], metrics["f1"], metrics["support"])
    lines += [f"{k:>5}  {p:>9.4f}  {r:>6.4f}  {f:>6.4f}  {s:>7,}" for k, (p, r, f, s) in enumerate(rows)]
    return "\n".join(lines)


def report_files(metrics: dict[str, Any], about: dict[str, Any]) -> dict[str, bytes]:
    """metrics.json (strict JSON, with `about`: checkpoint, data, split), confusion.csv and, with matplotlib,
    confusion.png."""
    text = io.StringIO()
    writer = csv.writer(text)
    classes = len(metrics["confusion"])
    writer.writerow(["true \\ predicted", *range(classes)])
    writer.writerows([k, *row] for k, row in enumerate(metrics["confusion"]))
    json_name, csv_name, png_name = REPORT_FILES
    files = {
        json_name: (strict_json({**about, **metrics}, indent=2) + "\n").encode(),
        csv_name: text.getvalue().encode(),
    }
    image = confusion_png(np.array(metrics["confusion"]), f"{about['data']} /{about['split']}")
    return files | ({png_name: image} if image else {})


def confusion_png(confusion: np.ndarray, title: str) -> bytes | None:
    """The confusion matrix as a PNG heat map, counts in the cells; None without matplotlib (the `plots` extra)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    classes = len(confusion)
    size = min(12.0, 2.0 + 0.5 * classes)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion, cmap="Blues")
    axes.set(xlabel="predicted class", ylabel="true class", title=title, xticks=range(classes), yticks=range(classes))
    if classes <= 30:  # beyond that, numbers in cells are unreadable
        high = confusion.max() or 1
        for (true, predicted), count in np.ndenumerate(confusion):
            colour = "white" if count > high / 2 else "black"
            axes.text(predicted, true, str(count), ha="center", va="center", color=colour, fontsize=8)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return out.getvalue()


def write_report(folder: Path, files: dict[str, bytes]) -> list[str]:
    """Write the report's files into `folder`, each atomically (a reader sees all of a file or none), and remove an
    earlier report's file this one lacks (a confusion.png from before matplotlib went); their names."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomically(folder / name, data)
        for name in set(REPORT_FILES) - set(files):
            (folder / name).unlink(missing_ok=True)
        return list(files)
    except OSError as exc:
        raise HpcdlError(f"cannot write the evaluation report in {folder}: {exc.strerror or exc}") from None
