"""Launch MPI jobs from the plain pytest suite, safely.

Each job runs in its own process group under a timeout; on timeout the whole
group (mpiexec and every rank) is killed and the test fails.  A deadlock is
therefore a failed test, never a hung suite.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # No progress bars in test logs.
    env.pop("MPITRAIN_RUN_PROGRESS", None)
    if extra:
        env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, check: bool = False, merge: bool = False,
        inherit: bool = True) -> Result:
    """Run ``cmd`` in a new process group; kill the group and fail on timeout.

    ``env`` adds to (or overrides) this process's environment, or with ``inherit=False`` is
    the whole environment; ``check`` fails the test on a non-zero exit; ``merge`` sends
    stderr into stdout (one interleaved log).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                            env=child_env(env) if inherit else env, cwd=cwd or REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s (a hang): {' '.join(cmd)}\n"
                    f"--- stdout\n{out[-3000:]}\n--- stderr\n{(err or '')[-3000:]}")
    res = Result(proc.returncode, out, err or "")
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{res.output[-6000:]}")
    return res


def mpiexec(nprocs: int, args: list[str], timeout: float = 120,
            env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Result:
    """``mpiexec -n nprocs python ARGS`` with the launcher that belongs to mpi4py."""
    return run([MPIEXEC, "-n", str(nprocs), sys.executable, *args],
               timeout=timeout, env=env, cwd=cwd)


def mpitrain(nprocs: int, args: list[str], **kw) -> Result:
    """``mpiexec -n nprocs python -m mpitrain ARGS``."""
    return mpiexec(nprocs, ["-m", "mpitrain", *args], **kw)
