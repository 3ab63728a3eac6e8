"""A sweep's results: ranked best first, as results.json, results.md, one printed table and a PNG per swept key."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STATUS_ORDER = {"ok": 0, "stopped": 1, "failed": 2}


def ranked(results: list[dict[str, Any] | None], mode: str) -> list[dict[str, Any]]:
    """Trained trials best first: finished ones by epochs trained (halving's survivors first), then their final
    metric; then stopped ones, then failed ones."""
    done = [r for r in results if r]

    def key(result: dict[str, Any]) -> tuple:
        metric = result.get("metric")
        missing = metric is None or (isinstance(metric, float) and math.isnan(metric))
        score = math.inf if missing else (-metric if mode == "max" else metric)
        return STATUS_ORDER.get(result["status"], 3), -result.get("epochs", 0), score, result["trial"]

    return sorted(done, key=key)


def row(result: dict[str, Any], metric: str) -> str:
    """One trial as a line of the live table."""
    value = result.get("metric")
    shown = f"{metric}={value:.4f}" if isinstance(value, float | int) else f"{metric}=-"
    settings = " ".join(f"{k}={v}" for k, v in result["overrides"].items())
    tail = f"  ({result['error']})" if result.get("error") else ""
    return (
        f"trial {result['trial']:>3}  {result['status']:<7} {shown}  epochs {result.get('epochs', 0):g}  "
        f"{result['seconds']:.1f} s  {settings}{tail}"
    )


def markdown(results: list[dict[str, Any]], metric: str) -> str:
    """results.md: one table row per trial, best first."""
    keys = list(dict.fromkeys(k for r in results for k in r["overrides"]))
    head = ["rank", "trial", *keys, metric, f"best {metric}", "epochs", "seconds", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for place, r in enumerate(results, 1):
        figures = [r.get("metric"), r.get("best")]
        shown = [f"{v:.4f}" if isinstance(v, float | int) else "-" for v in figures]
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        cells = [place, r["trial"], *(r["overrides"].get(k, "") for k in keys), *shown]
        cells += [f"{r.get('epochs', 0):g}", f"{r['seconds']:.1f}", status.replace("|", "/")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], metric: str, path: Path) -> None:
    """The metric against each swept key (numbers on their axis, log when they span decades; else categories)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in results if isinstance(r.get("metric"), float | int)]
    keys = list(dict.fromkeys(k for r in results for k in r["overrides"]))
    figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys):
        values = [r["overrides"][key] for r in scored]
        numbers = [_number(v) for v in values]
        if values and all(n is not None for n in numbers):
            axis.scatter(numbers, [r["metric"] for r in scored])
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
                axis.set_xscale("log")
        else:
            labels = list(dict.fromkeys(values))
            axis.scatter([labels.index(v) for v in values], [r["metric"] for r in scored])
            axis.set_xticks(range(len(labels)), labels, rotation=20)
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def write(out: Path, results: list[dict[str, Any] | None], metric: str, mode: str, seconds: float) -> list[str]:
    """results.json, results.md and sweep.png in `out`; the ranked table's lines."""
    best_first = ranked(results, mode)
    summary = {"metric": metric, "mode": mode, "seconds": seconds, "trials": best_first}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "results.md").write_text(markdown(best_first, metric))
    plot(best_first, metric, out / "sweep.png")
    return [row(r, metric) for r in best_first]
