"""``-n P``: run a command under ``mpiexec -n P``, with the launcher of mpi4py's MPI, and watch it.

The launch line itself (flags, environment, hosts, ULFM) comes from the MPI's launcher
profile, :func:`mpitrain.mpi_profiles.launch_command`.

Used by ``mpitrain run -n P`` (mpitrain.restarts.launch_run), ``mpitrain evaluate -n P`` and
``mpitrain bench SUB -n P`` (:func:`exec_under_mpiexec`), each with ``--hosts``/``--hostfile``
and mpiexec's own arguments after ``--`` (:func:`launch_options`).  The launching process
starts no MPI itself: it asks mpi4py which library it uses, checks that this machine can
hold P ranks, starts mpiexec as a child in its own process group, and stays as its
supervisor:

* signals (Ctrl-C, SIGTERM, SIGUSR1 of a preempting scheduler, SIGHUP) are passed on to the
  whole group, as a terminal would pass them to a foreground job, and to each local rank
  itself (Open MPI's ranks have process groups of their own, and its launcher would turn a
  Ctrl-C into a SIGTERM, i.e. a preemption: it gets those signals only before the ranks
  are up);
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
* a launcher killed by SIGPIPE after every rank it started here has completed ended a
  job that succeeded: with ``-disable-auto-cleanup`` and ranks on more than one host,
  MPICH's hydra tells every other proxy of each rank that exits -- also at a normal end --
  and the proxy it writes to may have exited already (2 hosts: about one run in four;
  see :func:`job_status`);
* ``--restarts N`` relaunches a failed run (mpitrain.restarts).
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from .context import LAUNCH_DIR_VAR, environment, mpi_launcher_rank
from .errors import CRASH_EXIT, PREEMPTED_EXIT, ConfigError, LaunchError
from .mpi_profiles import (LaunchOptions, Profile, check_hosts_resolve, current_profile,
                           launch_command)

RANKS_PER_CPU_MAX = 8      # beyond this a local job only thrashes (and MPI start-up may hang)
RANK_MEMORY_BYTES = 200e6  # what one rank needs at least: Python, NumPy, mpi4py, MPI buffers
STARTUP_S = 60.0           # start-up deadline: this, plus ...
STARTUP_S_PER_RANK = 1.0   # ... this per rank
EXIT_GRACE_S = 15.0        # after a rank ended on an error, the others have this long to end
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def run_under_mpiexec(nprocs: int, python_args: list[str], keep_survivors: bool = False,
                      options: LaunchOptions = LaunchOptions(),
                      records: dict[str, str] | None = None) -> int:
    """Run ``mpiexec -n NPROCS python PYTHON_ARGS`` under supervision (see the module
    docstring); returns the job's status.  ``records`` gets what the ranks left in the
    launch folder (``started-R``, ``exit-R``, ``done-R`` -> text), for mpitrain.restarts."""
    profile = current_profile()
    argv, env = mpiexec_command(nprocs, python_args, keep_survivors, options, profile)
    if options.hosts:
        check_hosts_resolve(options.hosts)
    # Ranks on other hosts cannot drop files into this machine's launch folder (unless it
    # is shared): there, only the local ones are counted, and start-up is not timed.
    local = not options.multi_host
    vanished = keep_survivors and profile.keep_survivors_exits_zero and local
    return run_supervised(argv, env, nprocs, records, profile=profile, timed_start=local,
                          vanished_is_crash=vanished, survivable=options.fault_tolerant)


def run_supervised(argv: list[str], env: dict[str, str], nprocs: int,
                   records: dict[str, str] | None = None, launch_parent: Path | None = None,
                   profile: Profile | None = None, timed_start: bool = True,
                   vanished_is_crash: bool = False, survivable: bool = False) -> int:
    """Run ``argv``, a launcher (mpiexec, srun) starting NPROCS ranks of mpitrain, under
    supervision; returns the job's status.  The ranks report into a launch folder made in
    ``launch_parent`` (default: the temporary folder; across nodes it must be shared).
    ``vanished_is_crash``: the launcher's own status says nothing (Open MPI keeping
    survivors exits 0), so a rank that left no record counts as crashed.  ``survivable``:
    the ranks survive a peer's death in place (ULFM), so a vanished rank ends nothing."""
    profile = profile or current_profile()
    launch_dir = Path(tempfile.mkdtemp(prefix="mpitrain-launch-", dir=launch_parent))
    env = dict(env)
    env[LAUNCH_DIR_VAR] = str(launch_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        proc = subprocess.Popen(argv, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        status = _supervise(proc, nprocs, launch_dir, profile, timed_start, survivable)
        if signal.SIGINT in _signalled and not any(launch_dir.glob("exit-*")):
            return 130  # Ctrl-C: what each MPI's launcher makes of it differs
        return job_status(status, launch_dir, nprocs, profile, vanished_is_crash)
    finally:
        if records is not None:
            records.update({p.name: p.read_text() for p in launch_dir.iterdir()})
        shutil.rmtree(launch_dir, ignore_errors=True)


def exec_under_mpiexec(nprocs: int, python_args: list[str], keep_survivors: bool = False,
                       options: LaunchOptions = LaunchOptions()) -> NoReturn:
    """:func:`run_under_mpiexec`, then exit with the job's status."""
    sys.exit(run_under_mpiexec(nprocs, python_args, keep_survivors, options))


def launch_options(nprocs: int | None, hosts: str | None, hostfile: str | None,
                   launcher_args: list[str], command: str) -> LaunchOptions:
    """The placement a command's ``-n P`` launch asks for (``--hosts``, ``--hostfile``,
    arguments after ``--``); a ConfigError when one is given without ``-n P``, which is the
    launch they describe (``command`` names the command in the hint)."""
    given = [name for name, value in (("--hosts needs", hosts), ("--hostfile needs", hostfile),
                                      ("launcher arguments after -- need", launcher_args))
             if value]
    if given and nprocs is None:
        raise ConfigError(f"{given[0]} -n P: they tell mpitrain's own mpiexec where and how "
                          f"to start the ranks",
                          hint=f"use `mpitrain {command} -n P --hosts a,b ... -- ARGS`, or give "
                               f"the hosts to the mpiexec or srun that you launch yourself")
    if hosts and hostfile:
        raise ConfigError("--hosts and --hostfile both given: the ranks' hosts come from one",
                          hint="keep one of them")
    return LaunchOptions(hosts, hostfile, tuple(launcher_args))


def mpiexec_command(nprocs: int, python_args: list[str], keep_survivors: bool = False,
                    options: LaunchOptions = LaunchOptions(),
                    profile: Profile | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of ``mpiexec -n NPROCS python PYTHON_ARGS``.

    Refuses a launch from inside an MPI job and, for a job on this machine alone, a P it
    cannot hold; the rest is :func:`mpitrain.mpi_profiles.launch_command` (the mpiexec that
    belongs to mpi4py's MPI, its settings for root, oversubscription and transports, one
    BLAS thread per rank).  ``keep_survivors`` keeps the other ranks alive when one dies
    (the ranks must then ignore SIGUSR1 outside training, which
    :func:`mpitrain.session.session` does: hydra sends it to the others when a rank exits).
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
    if not options.multi_host:
        check_resources(nprocs)
    return launch_command(nprocs, [sys.executable, *python_args], options,
                          keep_survivors=keep_survivors, profile=profile)


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


def signalled() -> bool:
    """Whether the supervisor passed a signal on to a job (Ctrl-C, SIGTERM ...)."""
    return bool(_signalled)


def _supervise(proc: subprocess.Popen, nprocs: int, launch_dir: Path, profile: Profile,
               timed_start: bool = True, survivable: bool = False) -> int:
    """Wait for mpiexec, passing signals on (to its group, or to the ranks themselves where
    the profile says so) and, with ``timed_start``, enforcing the start-up deadline."""
    def forward(signum: int, frame: Any) -> None:
        _signalled.append(signum)
        ranks = list(_rank_pids(launch_dir).values()) if signum in profile.rank_signals else []
        for pid in ranks or [-proc.pid]:  # before the ranks are up: the launcher's group
            try:
                os.kill(pid, signum)
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
            if first_exit is None and (any(launch_dir.glob("exit-*"))
                                       or (not survivable and _vanished(launch_dir))):
                first_exit = time.monotonic()
            elif first_exit is not None and time.monotonic() > first_exit + EXIT_GRACE_S:
                _stop(proc)  # a rank outlived the error its peers ended on: stuck
                return proc.wait()
            if started < nprocs:
                started = len(list(launch_dir.glob("started-*")))
                if started < nprocs and timed_start and time.monotonic() > deadline:
                    _stop(proc)
                    raise LaunchError(
                        f"MPI start-up did not finish: {started} of {nprocs} ranks were up "
                        f"after {STARTUP_S + STARTUP_S_PER_RANK * nprocs:.0f} s; the job was "
                        f"stopped", hint="use fewer ranks, or check that mpiexec belongs to "
                                         "mpi4py's MPI and that the machine is not overloaded")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _rank_pids(launch_dir: Path) -> dict[int, int]:
    """rank -> process id of the ranks on this machine that came up (context.World writes
    "PID HOST" into ``started-RANK``)."""
    pids, host = {}, socket.gethostname()
    for path in launch_dir.glob("started-*"):
        try:
            pid, where = path.read_text().split()
            if where == host:
                pids[int(path.name.split("-")[1])] = int(pid)
        except (OSError, ValueError):
            continue
    return pids


def _vanished(launch_dir: Path) -> bool:
    """Whether a rank on this machine is gone without a word (SIGKILL, the OOM killer): it
    came up, left no status, and its process no longer exists.  Its peers then have
    :data:`EXIT_GRACE_S` to end, as after a reported error; a launcher that leaves them
    waiting (srun after a task's death) does not keep the job hanging."""
    for rank, pid in _rank_pids(launch_dir).items():
        if not (launch_dir / f"exit-{rank}").exists() and \
                not (launch_dir / f"done-{rank}").exists() and not _alive(pid):
            return True
    return False


def _all_completed(launch_dir: Path) -> bool:
    """Whether every rank that came up on this machine completed (``done-R``): it wrote
    ``done`` after the closing handshake (mpitrain.comm.closing), i.e. once every peer had
    said bye -- or had not within the deadline -- so the job's training is over and what
    is left is MPI_Finalize and exit."""
    started = {path.name.split("-")[1] for path in launch_dir.glob("started-*")}
    done = {path.name.split("-")[1] for path in launch_dir.glob("done-*")}
    return bool(started) and started <= done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def job_status(launcher_status: int, launch_dir: Path, nprocs: int, profile: Profile,
               keep_survivors: bool, local: bool = True) -> int:
    """The status of a job that ``mpiexec`` ran (it exited ``launcher_status``) with
    ``nprocs`` ranks recording their ends in ``launch_dir`` (:data:`LAUNCH_DIR_VAR`,
    ``context.World.record_exit``), the same under every MPI.

    What the ranks that ended on an error recorded wins (a bug first, then a
    synchronization fault, then the rest), else mpiexec's own status.  With
    ``keep_survivors`` Open MPI's launcher exits 0 whatever the ranks did: there each
    ``local`` rank must have recorded its end, and one that did not crashed or was killed
    (:data:`CRASH_EXIT`) -- unless the survivors went on without it and completed
    (``lost-R``, mpitrain.recovery).  A launcher killed by SIGPIPE once every rank that
    came up here completed ended a job that succeeded (0): MPICH's hydra, keeping
    survivors, tells the other proxies of every exit and dies writing to one that has
    exited already (the module docstring).  Called once mpiexec has ended, by
    :func:`run_supervised` and by the tests that start mpiexec themselves (tests/mpirun.py).
    """
    recorded = set()
    for path in launch_dir.glob("exit-*"):
        try:
            recorded.add(int(path.read_text()))
        except ValueError:
            continue
    for code in (1, 3, 2, PREEMPTED_EXIT):
        if code in recorded:
            return code
    if launcher_status == -signal.SIGPIPE and _all_completed(launch_dir):
        return 0  # hydra's notice of a normal exit, to a proxy that had exited already
    if launcher_status < 0:  # mpiexec itself was killed by a signal
        return 128 - launcher_status
    if recorded:
        return min(recorded)
    silent = keep_survivors and profile.keep_survivors_exits_zero and local
    ended = len(list(launch_dir.glob("done-*")))
    lost = {rank for path in launch_dir.glob("lost-*") for rank in path.read_text().split()}
    if lost and ended + len(lost) == nprocs:
        return 0  # recovered in place: every rank either finished or was shrunk away
    return CRASH_EXIT if silent and launcher_status == 0 and ended < nprocs else launcher_status
