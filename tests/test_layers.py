"""The layering is checked, not remembered: import-linter's contracts in pyproject.toml (layers from the entry points
down to errors, data never importing the strategies, mpi4py only in the communication layer, the library never
importing the benchmarks or scaling studies) hold for the tree as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout, done.stdout
