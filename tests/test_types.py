"""The package type-checks: mypy over mpitrain/ (settings in setup.cfg, [mypy])."""
import subprocess
import sys

from mpirun import REPO


def test_mypy_passes_over_the_package():
    res = subprocess.run([sys.executable, "-m", "mypy", "mpitrain"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
