"""hpcdl as a user gets it: built into a wheel, installed in a fresh venv, run outside the checkout.

The Slurm templates are package data; a checkout hides a missing one (the files are right there),
an installed wheel does not. Offline: the build uses the venv's setuptools, the install --no-index.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
TEMPLATES = REPO / "hpcdl" / "slurm" / "templates"


@dataclass(frozen=True)
class Install:
    """A wheel of the checkout, installed in a venv of its own."""

    wheel: Path
    venv: Path
    site_packages: Path
    workdir: Path  # a folder outside the checkout to run from


def run(*argv: str | Path, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command to its end, output captured; a hang fails the test instead of blocking it."""
    # PYTHONPATH could point back into the checkout and hide what the wheel lacks.
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(map(str, argv))} hung for {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def checked(*argv: str | Path, timeout: float = 120) -> str:
    """Run a setup command that must succeed; its output."""
    result = run(*argv, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, argv))}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Install:
    """Build the wheel, install it (no dependencies) in a fresh venv that sees the project venv's packages."""
    # The dev extra installs setuptools: its absence is a broken install, not a reason to skip.
    assert importlib.util.find_spec("setuptools") is not None, "pip install -e '.[dev]' installs setuptools"
    root = tmp_path_factory.mktemp("wheel")
    assert REPO not in root.parents, "the install must be tested outside the checkout"
    # Build from a copy of what the build reads: setuptools writes build/ and *.egg-info next to
    # the sources, and those must not land in (or race on) the checkout.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "hpcdl", source / "hpcdl", ignore=shutil.ignore_patterns("__pycache__"))
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    checked(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", root / "dist", source)
    (wheel,) = (root / "dist").glob("hpcdl-*.whl")

    venv = root / "venv"
    checked(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    checked(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    site_packages = Path(checked(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    # torch, mpi4py, ... come from the project venv instead of a reinstall: a .pth file appends its
    # site-packages after the new venv's own, so `import hpcdl` still finds the wheel's copy first.
    ours = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
    (site_packages / "project-dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    workdir = root / "work"
    workdir.mkdir()
    return Install(wheel, venv, site_packages, workdir)


def test_wheel_ships_every_template(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    shipped = sorted(name for name in names if name.startswith("hpcdl/slurm/templates/"))
    assert "hpcdl/slurm/templates/train.sbatch" in shipped
    assert shipped == sorted(f"hpcdl/slurm/templates/{path.name}" for path in TEMPLATES.glob("*.sbatch"))
    # One source: the checkout's slurm/*.sbatch, which users submit, are links to the packaged files.
    for path in TEMPLATES.glob("*.sbatch"):
        assert (REPO / "slurm" / path.name).resolve() == path, path.name


def test_installed_cli_submits_the_packaged_template(installed):
    hpcdl = installed.venv / "bin" / "hpcdl"
    args = ("slurm", "submit", "train", "--dry-run", "--config", "digits-mlp", "--set", "train.epochs=2")
    result = run(hpcdl, *args, cwd=installed.workdir)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    template = installed.site_packages / "hpcdl" / "slurm" / "templates" / "train.sbatch"
    assert " sbatch --parsable " in line and line.endswith(f" {template}"), line
    assert template.read_text() == (REPO / "slurm" / "train.sbatch").read_text()


def test_installed_cli_lists_the_real_templates_for_an_unknown_one(installed):
    result = run(installed.venv / "bin" / "hpcdl", "slurm", "submit", "nosuch", "--dry-run", cwd=installed.workdir)
    names = ", ".join(sorted(path.stem for path in TEMPLATES.glob("*.sbatch")))
    assert "train" in names.split(", ")
    assert (result.returncode, result.stdout) == (2, ""), result.stdout
    assert result.stderr == f"hpcdl: error: slurm: unknown template 'nosuch' (templates: {names}, or an .sbatch file)\n"
