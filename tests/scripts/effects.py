"""Every probe of tests/test_effects.py trained in one MPI job: `mpiexec -n 2 python effects.py PROBES.json OUT.json`.

PROBES.json is a list of {"name", "settings": ["section.key=value", ...]}; each is trained in its own run folder on a
contained world (so a refusal ends only that probe, as in a sweep's trial), and rank 0 writes for each either
{"refused": the one line} or the run's records: what a user could see of its effect (summary and epoch records
without timings, the files it wrote, its printed lines with digits blanked).
"""

import contextlib
import dataclasses
import io
import json
import re
import sys
from pathlib import Path

from hpcdl import comm, config
from hpcdl.errors import HpcdlError, TrialFailed
from hpcdl.train import train

# Wall-clock figures: they differ between two runs of the same config.
VOLATILE = {"samples_per_s", "elapsed_s", "step_ms", "ms_per_step", "peak_rss_mb", "time"}


def without_timings(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in VOLATILE}


def records(run_dir: Path, printed: str) -> dict:
    """What the run shows of itself (rank 0)."""
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "summary": without_timings(summary),
        "records": [without_timings(r) for r in logged if r["event"] != "summary"],
        "files": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if "tensorboard" not in p.parts[-1:]),
        "lines": sorted({re.sub(r"\d+(\.\d+)?", "#", line) for line in printed.splitlines()}),
    }


def probe(world: comm.World, group: comm.World, base: str, run_dir: Path, settings: list[str]) -> dict:
    """Train one probe; its refusal or its records."""
    printed = io.StringIO()
    try:
        cfg = config.load(base, [*settings, f"run.dir='{run_dir}'"])
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            train(cfg, group)
    except (HpcdlError, TrialFailed) as exc:
        return {"refused": str(exc)}
    return records(run_dir, printed.getvalue()) if world.is_root else {}


def main() -> None:
    probes_file, out_file, base = sys.argv[1:4]
    world = comm.init()
    group = dataclasses.replace(world.split(0), contained=True)
    probes = json.loads(Path(probes_file).read_text())
    root = Path(out_file).parent / "runs"
    results = {p["name"]: probe(world, group, base, root / f"{i:03d}", p["settings"]) for i, p in enumerate(probes)}
    if world.is_root:
        Path(out_file).write_text(json.dumps(results, indent=1))


main()
