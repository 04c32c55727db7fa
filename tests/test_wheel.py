"""The package as a user installs it: a wheel built from the repository, installed (not
editable) into a fresh virtual environment, used from a folder outside the repository.

Needs the package index (or pip's cache) for the build backend and the dependencies.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpirun import REPO, run

pytestmark = pytest.mark.slow

# Not part of the source tree: left out of the copy the wheel is built from.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                    "__pycache__", ".pytest_cache", "results")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv with the wheel of this checkout installed."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"),
            str(source)], timeout=600)
    wheel, = (root / "dist").glob("mpitrain-*.whl")
    _check([sys.executable, "-m", "venv", str(root / "venv")], timeout=120)
    bin_dir = root / "venv" / "bin"
    # With the MPI extra, as the README installs it: the package alone needs only mpi4py.
    _check([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", f"{wheel}[mpich]"],
           timeout=600)
    return bin_dir


def _check(cmd: list[str], timeout: float) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def test_the_wheel_is_installed_not_linked_to_the_checkout(installed, tmp_path):
    res = run([str(installed / "python"), "-c", "import mpitrain; print(mpitrain.__file__)"],
              timeout=60, cwd=tmp_path, check=True)
    assert Path(res.stdout.strip()).is_relative_to(installed.parent)


def test_run_the_default_job_from_another_folder(installed, tmp_path):
    res = run([str(installed / "mpitrain"), "run", "-n", "2", "--set", "run.steps=20"],
              timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.output
    assert "mpitrain: done: 20 steps" in res.stderr
    assert (tmp_path / "runs" / "default" / "model.npz").exists()


def test_explain_scenario_finds_the_built_in_job(installed, tmp_path):
    res = run([str(installed / "mpitrain"), "explain", "--scenario"], timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.output
    assert res.stdout.startswith(
        "One step of the chapter's two-GPU scenario (jobs/chapter/two_gpus.toml)\n")
    assert "180 B as float32, 360 B as float64" in res.stdout


def test_a_fault_demo_runs_by_its_built_in_name(installed, tmp_path):
    res = run([str(installed / "mpitrain"), "run", "-n", "2", "faults/strict_drop"],
              timeout=120, cwd=tmp_path)
    assert res.returncode == 3, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("mpitrain: error:")]
    assert len(errors) == 1, res.stderr
    assert "received nothing from rank 1" in errors[0] and "Injected fault: drop" in errors[0]
    assert "Traceback" not in res.output
    assert (tmp_path / "runs" / "strict_drop").is_dir()  # named after the job file's stem
