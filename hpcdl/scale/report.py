"""`hpcdl scale report`: results folders -> speedup/efficiency table (Markdown, CSV) and PNG plots."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdl.errors import DataError
from hpcdl.plot import pyplot

SPLIT = ("data", "compute", "comm", "optimizer", "other")
SPLIT_COLORS = {"data": "#8c8c8c", "compute": "#4c72b0", "comm": "#dd8452", "optimizer": "#55a868", "other": "#c9c9c9"}


@dataclass
class Row:
    """One rank count of one study: medians over its repeats, and how it compares with the smallest size."""

    label: str
    mode: str
    ranks: int
    nodes: int
    threads: int
    repeats: int
    samples_per_s: float
    spread: float  # half the range of the repeats, relative to the median
    step_ms: float
    split_ms: dict[str, float]
    speedup: float  # samples/s relative to the smallest rank count
    ideal: float  # ranks / smallest rank count
    efficiency: float  # speedup / ideal
    comm_mb_per_step: float
    peak_rss_mb: float  # the largest rank's
    oversubscribed: bool


def load_study(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(study.json or {}, every run-*.json) of a results folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such results folder")
    meta = {}
    if (folder / "study.json").is_file():
        meta = _read_json(folder / "study.json")
    runs = [_read_json(p) for p in sorted(folder.glob("run-r*-rep*.json"))]
    if not runs:
        raise DataError(f"{folder}: no run-r*-rep*.json files (see hpcdl/scale/__init__.py for the format)")
    return meta, runs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None


def summarize(meta: dict[str, Any], runs: list[dict[str, Any]], folder: str = "") -> list[Row]:
    """Rows per rank count, medians over repeats; speedup and efficiency against the smallest rank count."""
    by_ranks: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        by_ranks.setdefault(int(run["ranks"]), []).append(run)
    label = meta.get("label") or runs[0].get("label") or Path(folder).name
    mode = meta.get("mode") or runs[0].get("mode", "strong")
    smallest = min(by_ranks)
    base_rate = statistics.median(r["samples_per_s"] for r in by_ranks[smallest])
    rows = []
    for ranks in sorted(by_ranks):
        group = by_ranks[ranks]
        rates = [r["samples_per_s"] for r in group]
        rate = statistics.median(rates)
        speedup = rate / base_rate if base_rate else 0.0
        ideal = ranks / smallest
        rows.append(
            Row(
                label=label,
                mode=mode,
                ranks=ranks,
                nodes=max(r.get("nodes", 1) for r in group),
                threads=group[0].get("threads_per_rank", 1),
                repeats=len(group),
                samples_per_s=rate,
                spread=(max(rates) - min(rates)) / 2 / rate if rate else 0.0,
                step_ms=statistics.median(r["step_ms"] for r in group),
                split_ms={k: statistics.median(r["split_ms"].get(k, 0.0) for r in group) for k in SPLIT},
                speedup=speedup,
                ideal=ideal,
                efficiency=speedup / ideal,
                comm_mb_per_step=statistics.median(r.get("comm_bytes_per_step", 0) for r in group) / 2**20,
                peak_rss_mb=max(max(r.get("peak_rss_mb") or [0.0]) for r in group),
                oversubscribed=any(r.get("oversubscribed", False) for r in group),
            )
        )
    return rows


HEADERS = [
    "study",
    "mode",
    "ranks",
    "nodes",
    "threads/rank",
    "samples/s",
    "spread",
    "speedup",
    "ideal",
    "efficiency",
    "ms/step",
    *[f"{k} ms" for k in SPLIT],
    "comm MiB/step",
    "peak MiB/rank",
    "oversubscribed",
]


def table_cells(row: Row) -> list[str]:
    """A row's cells, rounded for reading; oversubscribed runs say so in their rank cell too."""
    return [
        row.label,
        row.mode,
        f"{row.ranks}{' (oversubscribed)' if row.oversubscribed else ''}",
        str(row.nodes),
        str(row.threads),
        f"{row.samples_per_s:,.0f}",
        f"±{100 * row.spread:.0f}%",
        f"{row.speedup:.2f}",
        f"{row.ideal:g}",
        f"{row.efficiency:.2f}",
        f"{row.step_ms:.2f}",
        *[f"{row.split_ms[k]:.2f}" for k in SPLIT],
        f"{row.comm_mb_per_step:.2f}",
        f"{row.peak_rss_mb:.0f}",
        "yes" if row.oversubscribed else "no",
    ]


def write_tables(rows: list[Row], out: Path) -> tuple[Path, Path]:
    """scaling.md (Markdown) and scaling.csv (full precision) in `out`."""
    from hpcdl.studies import table

    md = out / "scaling.md"
    note = ""
    if any(r.oversubscribed for r in rows):
        note = "\n\nOversubscribed: ranks x threads exceed the cores; not a speed figure.\n"
    md.write_text(table(HEADERS, [table_cells(r) for r in rows]) + note + "\n")
    path = out / "scaling.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["study", "mode", "ranks", "nodes", "threads_per_rank", "repeats", "samples_per_s", "spread", "speedup"]
            + ["ideal", "efficiency", "step_ms", *[f"{k}_ms" for k in SPLIT], "comm_mib_per_step"]
            + ["peak_rss_mib", "oversubscribed"]
        )
        for r in rows:
            writer.writerow(
                [r.label, r.mode, r.ranks, r.nodes, r.threads, r.repeats, r.samples_per_s, r.spread, r.speedup]
                + [r.ideal, r.efficiency, r.step_ms, *[r.split_ms[k] for k in SPLIT], r.comm_mb_per_step]
                + [r.peak_rss_mb, r.oversubscribed]
            )
    return md, path


def speedup_figure(studies: list[list[Row]]):
    """Measured speedup per study against the ideal line; oversubscribed points hollow and labelled."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    top = max(r.ideal for rows in studies for r in rows)
    ax.plot([1, top], [1, top], "k--", linewidth=1, label="ideal")
    for rows in studies:
        ax.plot([r.ideal for r in rows], [r.speedup for r in rows], "o-", label=f"{rows[0].label} ({rows[0].mode})")
        _mark_oversubscribed(ax, rows, [r.speedup for r in rows])
    ax.set(xlabel="ranks / smallest run", ylabel="speedup (samples/s)", title="Speedup")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def efficiency_figure(studies: list[list[Row]]):
    """Parallel efficiency (speedup / ideal) per study; 1.0 is perfect."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    top = max(r.ideal for rows in studies for r in rows)
    ax.plot([1, top], [1, 1], "k--", linewidth=1, label="ideal")
    for rows in studies:
        ax.plot([r.ideal for r in rows], [r.efficiency for r in rows], "o-", label=f"{rows[0].label} ({rows[0].mode})")
        _mark_oversubscribed(ax, rows, [r.efficiency for r in rows])
    ax.set(xlabel="ranks / smallest run", ylabel="parallel efficiency", title="Efficiency", ylim=(0, 1.2))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _mark_oversubscribed(ax, rows: list[Row], ys: list[float]) -> None:
    for row, y in zip(rows, ys):
        if row.oversubscribed:
            ax.plot([row.ideal], [y], "o", markersize=11, markerfacecolor="none", color="red")
            ax.annotate(
                "oversubscribed", (row.ideal, y), fontsize=7, color="red", xytext=(4, -10), textcoords="offset points"
            )


def breakdown_figure(studies: list[list[Row]]):
    """Stacked time per step (data, compute, exposed comm, optimizer, other) per rank count, one panel per study."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(studies), figsize=(2.6 + 2.2 * len(studies), 3.6), dpi=100, squeeze=False)
    for ax, rows in zip(axes[0], studies):
        names = [f"{r.ranks}*" if r.oversubscribed else str(r.ranks) for r in rows]
        bottom = [0.0] * len(rows)
        for part in SPLIT:
            heights = [r.split_ms[part] for r in rows]
            hatch = ["//" if r.oversubscribed else "" for r in rows]
            bars = ax.bar(names, heights, bottom=bottom, color=SPLIT_COLORS[part], label=part)
            for bar, h in zip(bars, hatch):
                bar.set_hatch(h)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set(xlabel="ranks (* oversubscribed)", ylabel="ms per step", title=rows[0].label)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Where a step's time goes (slowest rank)", fontsize=10)
    fig.tight_layout()
    return fig


def report(dirs: list[str], out: str | None = None) -> dict[str, Path]:
    """Tables and plots for results folders (one series each); returns the files written."""
    studies = [summarize(*load_study(d), folder=d) for d in dirs]
    target = Path(out or dirs[0])
    target.mkdir(parents=True, exist_ok=True)
    md, csv_path = write_tables([r for rows in studies for r in rows], target)
    files = {"markdown": md, "csv": csv_path}
    plt = pyplot()
    for name, build in (
        ("speedup", speedup_figure),
        ("efficiency", efficiency_figure),
        ("breakdown", breakdown_figure),
    ):
        fig = build(studies)
        files[name] = target / f"{name}.png"
        fig.savefig(files[name])
        plt.close(fig)
    print(md.read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return files
