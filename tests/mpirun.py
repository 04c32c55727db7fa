"""Launch MPI jobs from the plain pytest suite, safely.

Each job runs in its own process group under a timeout; on timeout the whole
group (mpiexec and every rank) is killed and the test fails.  A deadlock is
therefore a failed test, never a hung suite.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpitrain.context import LAUNCH_DIR_VAR
from mpitrain.launch import job_status
from mpitrain.mpi_profiles import launch_command, profile_for

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec")
REPO = Path(__file__).resolve().parent.parent


def suite_library() -> tuple[str, str]:
    """(mpi4py's version, its MPI library's version text), asked in a child process with MPI
    left uninitialised, so the suite's own process starts no MPI (nor imports mpi4py.MPI)."""
    probe = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
             "print(mpi4py.__version__); print(MPI.Get_library_version().strip())")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"mpi4py cannot load its MPI library: {res.stderr.strip()[-300:]}")
    version, library = res.stdout.split("\n", 1)
    return version, library


PROFILE = profile_for(suite_library()[1])  # the launcher profile of the suite's MPI


@dataclass
class Result:
    returncode: int  # the launcher's (or the command's) own exit status
    stdout: str
    stderr: str
    # job(): the job's status as `mpitrain run -n` judges it (launch.job_status), the same
    # under every MPI -- Open MPI's mpiexec with keep-survivors options exits 0 regardless
    status: int | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with what a local launch of the suite's MPI needs (its
    launcher profile: root, oversubscription, transports), one BLAS thread, no bars."""
    env = dict(os.environ)
    for key, value in PROFILE.local_env.items():
        env.setdefault(key, value)
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


def mpiexec_argv(nprocs: int, program: list[str], keep_survivors: bool = False) -> list[str]:
    """``mpiexec -n nprocs PROGRAM`` as its launcher profile spells it (``keep_survivors``:
    the other ranks live on when one dies, as under `mpitrain run -n`)."""
    argv, _ = launch_command(nprocs, program, keep_survivors=keep_survivors, profile=PROFILE,
                             mpiexec=Path(MPIEXEC))
    return argv


def mpiexec(nprocs: int, args: list[str], timeout: float = 120,
            env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Result:
    """``mpiexec -n nprocs python ARGS`` with the launcher that belongs to mpi4py."""
    return run(mpiexec_argv(nprocs, [sys.executable, *args]), timeout=timeout, env=env, cwd=cwd)


def mpitrain(nprocs: int, args: list[str], **kw) -> Result:
    """``mpiexec -n nprocs python -m mpitrain ARGS``."""
    return mpiexec(nprocs, ["-m", "mpitrain", *args], **kw)


def job(nprocs: int, program: list[str], keep_survivors: bool = True, timeout: float = 120,
        env: dict[str, str] | None = None) -> Result:
    """Run ``program`` (a command line whose ranks record their ends with
    ``context.World.record_exit``) as ``nprocs`` ranks under mpiexec, as `mpitrain run -n`
    does: with a launch folder, and ``keep_survivors`` (the survivors of a dead rank live on
    to report it).  ``Result.status`` is the job's status from the ranks' records
    (:func:`mpitrain.launch.job_status`), ``Result.returncode`` mpiexec's own."""
    launch_dir = Path(tempfile.mkdtemp(prefix="mpitrain-test-launch-"))
    try:
        res = run(mpiexec_argv(nprocs, program, keep_survivors=keep_survivors), timeout=timeout,
                  env={**(env or {}), LAUNCH_DIR_VAR: str(launch_dir)})
        res.status = job_status(res.returncode, launch_dir, nprocs, PROFILE, keep_survivors)
        return res
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)


def processes_of(out: Path) -> list[int]:
    """Processes anywhere on the machine whose command line names the run folder ``out``
    (its ranks; one orphaned by its launcher is no descendant of the test any more)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            continue
    return found
