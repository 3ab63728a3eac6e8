"""Models in float64, float32, float16, bfloat16 and mixed float32/float64 train through every entry point
(config, hpcdl.DataParallel, hpcdl.horovod) at 2 and 3 ranks and equal one process within the dtype's rounding."""

import json

import pytest

from conftest import REPO, run_mpi

KINDS = ("float64", "float32", "float16", "bfloat16", "mixed")
ENTRIES = ("config", "hpcdl.DataParallel", "hpcdl.horovod")


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_dtype_through_every_entry_point_equals_one_process(datasets, tmp_path, ranks):
    script = REPO / "tests/scripts/dtype_check.py"
    result = run_mpi(ranks, str(script), str(datasets["synthetic"]), str(tmp_path), timeout=300)
    cases = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(c["entry"], c["dtype"]) for c in cases} == {(e, k) for e in ENTRIES for k in KINDS}, result.stderr[-3000:]
    off = [c for c in cases if not c["ok"]]
    assert not off, off
    assert result.returncode == 0, result.stderr[-3000:]
    float64 = [c["max_error"] for c in cases if c["dtype"] == "float64"]
    assert max(float64) < 1e-12  # reduced as MPI_DOUBLE: float64's own rounding, not float32's
