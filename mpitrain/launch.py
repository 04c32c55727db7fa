"""``-n P``: run a command under ``mpiexec -n P``, with the launcher of mpi4py's MPI, and watch it.

Used by ``mpitrain run -n P`` (:func:`launch_run`) and ``mpitrain bench SUB -n P``
(:func:`run_under_mpiexec`).  The launching process starts no MPI itself: it asks mpi4py
which library it uses, checks that this machine can hold P ranks, starts mpiexec as a child
in its own process group, and stays as its supervisor:

* signals (Ctrl-C, SIGTERM, SIGUSR1 of a preempting scheduler, SIGHUP) are passed on to the
  whole group, as a terminal would pass them to a foreground job;
* start-up has a deadline: each rank drops a file into a launch folder once MPI is up
  (``context.World``); a job whose ranks have not all arrived in time is stopped with one
  message instead of hanging in MPI start-up;
* once a rank has ended on an error, the others have :data:`EXIT_GRACE_S` to end too (they
  agree on the error within the transport's grace and meet before leaving); a rank still
  running then is stuck -- in a native collective, say, that its dead peer will never join --
  and the job is stopped instead of hanging;
* the exit status is the job's, made deterministic: each rank that ends on an error records
  its status there too (``session``), and the most meaningful one wins over what mpiexec
  reports (MPICH's hydra ORs the statuses: a crashed rank's 70 with the survivors' 3 is 71);
* ``--restarts N`` relaunches a run that ended on a rank's death or an unrecovered
  synchronization fault from its newest checkpoint, up to N times, with a growing pause;
  each restart is a line on the terminal and an event in the run's events.jsonl.  A bug (1),
  bad input (2), a preemption (75) and a job stopped by a signal to the launcher (Ctrl-C,
  SIGTERM) are never retried; any other failure -- a synchronization fault (3), a crashed or
  killed rank, whatever status the MPI launcher makes of it -- is.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from . import config, jobs
from .context import LAUNCH_DIR_VAR, environment, mpi_launcher_rank
from .errors import PREEMPTED_EXIT, ConfigError, LaunchError

OPENMPI_LOCAL_ENV = {  # what a local Open MPI launch as root, on a small machine, needs
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm",
}
RANKS_PER_CPU_MAX = 8      # beyond this a local job only thrashes (and MPI start-up may hang)
RANK_MEMORY_BYTES = 200e6  # what one rank needs at least: Python, NumPy, mpi4py, MPI buffers
STARTUP_S = 60.0           # start-up deadline: this, plus ...
STARTUP_S_PER_RANK = 1.0   # ... this per rank
EXIT_GRACE_S = 15.0        # after a rank ended on an error, the others have this long to end
NOT_RETRIED = (0, 1, 2, PREEMPTED_EXIT, 130)  # success, a bug, bad input, preempted, Ctrl-C
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def launch_run(nprocs: int, job: str | None, overrides: list[str], faults: list[str],
               start_flags: list[str], restarts: int = 0) -> NoReturn:
    """Run ``mpitrain run`` with these arguments under ``mpiexec -n NPROCS``; exit with the
    job's status (``start_flags``: --resume, --overwrite, --allow-change KEY, passed on as
    they are).  With ``restarts``, relaunch with --resume after a death or a sync fault."""
    if restarts < 0:
        raise ConfigError(f"--restarts {restarts}: must be >= 0")
    overrides = list(overrides)
    # Check the job before starting any rank, and keep the progress bar: under mpiexec the
    # ranks write into pipes, so they cannot see that the user is at a terminal.
    cfg = config.load(jobs.resolve(job), overrides, environment(),
                      extra_rules=[config.parse_fault(f) for f in faults])
    if cfg.run.progress == "auto" and sys.stderr.isatty():
        overrides.append('run.progress="bar"')
    argv = ["-m", "mpitrain", "run", *([job] if job else [])]
    for o in overrides:
        argv += ["--set", o]
    for f in faults:
        argv += ["--fault", f]
    # Keep the other ranks alive when one dies, so they can say which one did (hydra's
    # default kills them all at once, silently).  A rank that fails alone still takes the
    # job down with MPI_Abort.
    status = run_under_mpiexec(nprocs, argv + start_flags, keep_survivors=True)
    for attempt in range(1, restarts + 1):
        if status in NOT_RETRIED or _signalled:
            break
        pause = min(30.0, 2.0 ** (attempt - 1))
        print(f"mpitrain: restart {attempt} of {restarts} in {pause:g} s: the run ended with "
              f"status {status}; resuming from its newest checkpoint", file=sys.stderr, flush=True)
        _record_restart(cfg.out_dir(environment().get("SLURM_JOB_ID")), attempt, status)
        time.sleep(pause)
        resume = [f for f in start_flags if f != "--overwrite"]
        resume += [] if "--resume" in resume else ["--resume"]
        status = run_under_mpiexec(nprocs, argv + resume, keep_survivors=True)
    sys.exit(status)


def _record_restart(out: Path, attempt: int, status: int) -> None:
    """An event in the run's events.jsonl (the resumed run keeps records up to its step)."""
    from .checkpoint import list_checkpoints
    found = list_checkpoints(out)
    step = int(found[-1].stem.split("-")[1]) if found else 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "restart", "step": step, "attempt": attempt,
                             "previous_status": status, "t": time.time()}) + "\n")


def run_under_mpiexec(nprocs: int, python_args: list[str], keep_survivors: bool = False) -> int:
    """Run ``mpiexec -n NPROCS python PYTHON_ARGS`` under supervision (see the module
    docstring); returns the job's exit status."""
    argv, env = mpiexec_command(nprocs, python_args, keep_survivors)
    launch_dir = Path(tempfile.mkdtemp(prefix="mpitrain-launch-"))
    env[LAUNCH_DIR_VAR] = str(launch_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        proc = subprocess.Popen(argv, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        status = _supervise(proc, nprocs, launch_dir)
        return _job_status(status, launch_dir)
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)


def exec_under_mpiexec(nprocs: int, python_args: list[str],
                       keep_survivors: bool = False) -> NoReturn:
    """:func:`run_under_mpiexec`, then exit with the job's status."""
    sys.exit(run_under_mpiexec(nprocs, python_args, keep_survivors))


def mpiexec_command(nprocs: int, python_args: list[str],
                    keep_survivors: bool = False) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of ``mpiexec -n NPROCS python PYTHON_ARGS``.

    Uses the mpiexec that belongs to mpi4py's MPI (another MPI's launcher silently starts
    NPROCS separate rank-0 jobs), with what a local run needs: one BLAS thread per rank, and
    for Open MPI the settings for root and oversubscription.  ``keep_survivors`` passes
    MPICH's -disable-auto-cleanup (the ranks must then ignore SIGUSR1 outside training,
    which :func:`mpitrain.session.session` does).
    """
    if nprocs < 1:
        raise ConfigError(f"-n {nprocs}: the number of ranks must be >= 1")
    outer = mpi_launcher_rank(environment())
    if outer is not None:
        raise LaunchError(f"-n {nprocs} inside an MPI job (this process is rank {outer} of a "
                          f"job that mpiexec or srun started): each process would start "
                          f"{nprocs} ranks of its own",
                          hint="launch with either `mpitrain run -n P` or mpiexec/srun, "
                               "not both")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        raise LaunchError(f"no mpiexec next to {sys.executable}",
                          hint="install MPI from PyPI into this environment (pip install mpich), "
                               "or launch with your cluster's mpiexec/srun yourself")
    check_resources(nprocs)
    import mpi4py
    mpi4py.rc.initialize = False  # only ask which library; do not start MPI in the launcher
    from mpi4py import MPI
    library = MPI.Get_library_version()
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if "Open MPI" in library:
        for k, v in OPENMPI_LOCAL_ENV.items():
            env.setdefault(k, v)
    argv = [str(mpiexec), "-n", str(nprocs)]
    if keep_survivors and "MPICH" in library:
        argv.append("-disable-auto-cleanup")
    return argv + [sys.executable, *python_args], env


def check_resources(nprocs: int, cpus: int | None = None, free: float | None = None) -> None:
    """``-n P`` starts P ranks on this machine: refuse a P it cannot hold (CPUs this process
    may use, times :data:`RANKS_PER_CPU_MAX`; available memory over
    :data:`RANK_MEMORY_BYTES`), before MPI start-up thrashes or hangs."""
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    free = free if free is not None else _available_memory()
    most = min(cpus * RANKS_PER_CPU_MAX, int(free // RANK_MEMORY_BYTES) if free else math.inf)
    if nprocs <= most:
        return
    raise LaunchError(
        f"-n {nprocs}: this machine has {cpus} CPU(s)"
        f"{f' and {free / 2**30:.1f} GiB of available memory' if free else ''}; it holds at most "
        f"{most} ranks ({RANKS_PER_CPU_MAX} per CPU, {RANK_MEMORY_BYTES / 1e6:.0f} MB each)",
        hint="use fewer ranks, or run across hosts with your cluster's mpiexec or srun")


def _available_memory() -> float:
    """MemAvailable from /proc/meminfo in bytes (0: unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


_signalled: list[int] = []  # signals passed on to the job: a stopped job is not restarted


def _supervise(proc: subprocess.Popen, nprocs: int, launch_dir: Path) -> int:
    """Wait for mpiexec, passing signals on to its group and enforcing the start-up deadline."""
    def forward(signum: int, frame: Any) -> None:
        _signalled.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        deadline = time.monotonic() + STARTUP_S + STARTUP_S_PER_RANK * nprocs
        started, first_exit = 0, None
        while True:
            try:
                return proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
            if first_exit is None and any(launch_dir.glob("exit-*")):
                first_exit = time.monotonic()
            elif first_exit is not None and time.monotonic() > first_exit + EXIT_GRACE_S:
                _stop(proc)  # a rank outlived the error its peers ended on: stuck
                return proc.wait()
            if started < nprocs:
                started = len(list(launch_dir.glob("started-*")))
                if started < nprocs and time.monotonic() > deadline:
                    _stop(proc)
                    raise LaunchError(
                        f"MPI start-up did not finish: {started} of {nprocs} ranks were up "
                        f"after {STARTUP_S + STARTUP_S_PER_RANK * nprocs:.0f} s; the job was "
                        f"stopped", hint="use fewer ranks, or check that mpiexec belongs to "
                                         "mpi4py's MPI and that the machine is not overloaded")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    """In mpiexec, before it starts: a SIGKILL when its supervisor dies (Linux), so a killed
    `mpitrain run -n` leaves no job behind (MPICH's proxies then end the ranks)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """End mpiexec and every rank: SIGTERM, then SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _job_status(status: int, launch_dir: Path) -> int:
    """The job's status: what the ranks that ended on an error recorded (a bug first, then
    a synchronization fault, then the rest), else mpiexec's own."""
    recorded = set()
    for path in launch_dir.glob("exit-*"):
        try:
            recorded.add(int(path.read_text()))
        except ValueError:
            continue
    for code in (1, 3, 2, PREEMPTED_EXIT):
        if code in recorded:
            return code
    if status < 0:  # mpiexec itself was killed by a signal
        return 128 - status
    return min(recorded) if recorded else status
