"""RankContext: the one module that reads MPI.COMM_WORLD and the environment.

Everything else in mpitrain is handed a :class:`RankContext` (or plain values taken from
it).  That keeps the rest testable without MPI and makes every global input visible here:

* the process environment (``MPITRAIN_*`` settings, Slurm variables, launcher variables);
* ``MPI.COMM_WORLD``, of which the harness only ever uses a *duplicate*, so its messages
  can never match those of user code or of another library on the same processes;
* the BLAS thread pool (one thread per rank by default: ranks of several BLAS threads
  each fight over the cores and run 3-10x slower);
* the array module ``xp``: NumPy on the CPU, CuPy on the GPU (see backend.py), the GPU
  chosen by the rank's place on its node.

The process's signals (a preemption becomes a flag the loop reads) are stop_signal.py's.
"""
from __future__ import annotations

import atexit
import math
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

from .backend import array_module
from .comm.waiting import Waiter, spin_budget
from .errors import LaunchError, MpitrainError

if TYPE_CHECKING:
    from .config import JobConfig

# Variables that launchers set to the size of the job they started.  If one says P > 1
# but MPI sees a world of 1, each process was started by a launcher that does not belong
# to the MPI library mpi4py was built against: P independent rank-0 jobs.
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
                      "SLURM_STEP_NUM_TASKS", "PMI_NUM_RANKS")


FOREIGN_LAUNCHER_HINT = ("launch with the mpiexec that belongs to mpi4py (or `mpitrain run -n P "
                         "JOB`; `mpitrain doctor` names it), or under Slurm with the matching "
                         "PMI: srun --mpi=pmi2 for MPICH and Intel MPI, srun --mpi=pmix for "
                         "Open MPI")

# The folder where ranks started by ``mpitrain run -n P`` report that MPI is up and, when
# they end on an error, their exit status (see mpitrain.launch).  Not MPITRAIN_*: those
# variables are job settings.
LAUNCH_DIR_VAR = "_MPITRAIN_LAUNCH_DIR"

# ... and to this process's rank in it (MPICH/hydra, Open MPI, PMIx, Slurm).
LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def environment() -> dict[str, str]:
    """A snapshot of the process environment, the only one mpitrain takes."""
    return dict(os.environ)


def mpi_launcher_rank(env: dict[str, str]) -> int | None:
    """This process's rank in an MPI job that a launcher (mpiexec, srun --mpi) started, from
    the MPI launchers' own variables (not Slurm's task id: a batch script has one too)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def launcher_rank(env: dict[str, str] | None = None) -> int | None:
    """This process's rank as its launcher announced it, without starting MPI (None: none).

    For messages that must appear once even when MPI is not (or no longer) usable, e.g. on
    Ctrl-C, which the launcher forwards to every rank at once.
    """
    env = environment() if env is None else env
    for var in LAUNCHER_RANK_VARS:
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def mpi():
    """The MPI module (started by :func:`start_mpi`, or on import where nothing deferred it)."""
    from .mpi_profiles import import_mpi
    return import_mpi()


def defer_mpi_start() -> None:
    """Keep the first import of mpi4py.MPI from starting MPI, so that :func:`start_mpi` can
    look at the launcher first.  The command line calls it before importing anything else;
    without it (a script, pytest-mpi) MPI starts on import, as mpi4py's default is."""
    import mpi4py
    mpi4py.rc.initialize = False


def start_mpi(env: dict[str, str]) -> Any:
    """Start MPI in this process (once; returns the MPI module), after checking that the
    launcher's environment belongs to the library mpi4py loads: another MPI's launcher makes
    MPI start-up abort (MPICH under a PMIx launcher: "unsupported PMI version", exit 16)
    or start P separate worlds, before any rank could say why.  A LaunchError then, which
    the command line prints from the launcher's rank 0 only."""
    MPI = mpi()
    if MPI.Is_initialized():
        return MPI
    from .mpi_profiles import launcher_mismatch
    problem = launcher_mismatch(env, MPI.Get_library_version())
    if problem:
        raise LaunchError(problem, hint=FOREIGN_LAUNCHER_HINT)
    MPI.Init_thread(MPI.THREAD_MULTIPLE)
    atexit.register(_finalize, MPI)  # as mpi4py does for an MPI it started itself
    return MPI


def _finalize(MPI: Any) -> None:
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


@dataclass(frozen=True)
class SlurmInfo:
    job_id: str | None
    restart_count: int

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "SlurmInfo":
        return cls(env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT") or 0))


class World:
    """COMM_WORLD as the harness sees it before a job is configured."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.comm = start_mpi(env).COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local_rank = node_local_rank(self.comm)
        launch_dir = env.get(LAUNCH_DIR_VAR)
        self.launch_dir = Path(launch_dir) if launch_dir else None
        self._tell_launcher(f"started-{self.rank}", f"{os.getpid()} {socket.gethostname()}")

    def record_exit(self, code: int) -> None:
        """Tell ``mpitrain run -n``'s supervisor the status this rank ends with (it makes
        the job's status from the ranks' own, see mpitrain.launch): ``exit-RANK`` for an
        error, ``done-RANK`` for a normal end."""
        self._tell_launcher(f"{'exit' if code else 'done'}-{self.rank}", str(code))

    def _tell_launcher(self, name: str, text: str) -> None:
        if self.launch_dir is not None:
            try:
                (self.launch_dir / name).write_text(text)
            except OSError:  # the supervisor is gone: nobody to tell
                pass

    def check_launcher(self) -> None:
        """Fail if the launcher started P processes but MPI sees a world of one."""
        if self.size != 1:
            return
        for var in LAUNCHER_SIZE_VARS:
            value = self.env.get(var, "")
            if value.isdigit() and int(value) > 1:
                self._foreign_launcher(f"the launcher started {value} processes ({var}={value})")
        procid = self.env.get("SLURM_PROCID", "")
        if procid.isdigit() and int(procid) > 0:  # srun's task N > 0, yet alone in its world
            self._foreign_launcher(f"this is task {procid} of a Slurm step (SLURM_PROCID)")

    @staticmethod
    def _foreign_launcher(what: str) -> None:
        lib = mpi().Get_library_version().splitlines()[0].strip()
        raise LaunchError(
            f"{what} but MPI sees a world of 1: every process is its own rank 0, training a "
            f"separate copy. mpi4py here uses {lib}; its launcher is "
            f"{os.path.join(os.path.dirname(sys.executable), 'mpiexec')}.",
            hint=FOREIGN_LAUNCHER_HINT)

    def all_present(self, timeout: float) -> bool:
        """Collective barrier that gives up after ``timeout`` seconds: are all ranks alive?

        Used on the way out after an error that every rank raised: a dead rank must not
        make the others wait forever.
        """
        try:
            return Waiter(timeout).wait_for(self.comm.Ibarrier())
        except mpi().Exception:  # fault-tolerant MPI (ULFM) names a dead rank: not all there
            return False

    @staticmethod
    def release_shared_memory() -> None:
        """Unlink the MPI shared-memory segments this process maps (Linux, best effort).

        MPICH removes its /dev/shm segments in MPI_Finalize; a rank that leaves without it
        (after an error, to never wait for a dead peer) would leave megabytes behind per
        run.  Unlinking only removes the names: ranks still attached keep working.
        """
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "/dev/shm/mpich" in line}
        except OSError:
            return
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    @contextmanager
    def collective_errors(self) -> Iterator[None]:
        """Make a user error on any rank an error on every rank.

        All ranks must enter and leave this block together.  If the block raises an
        :class:`MpitrainError` on some ranks, every rank raises one, carrying
        ``reporter`` = the lowest failing rank, so the message is printed once and no rank
        goes on alone into a collective that would never complete.
        """
        MPI = mpi()
        error: MpitrainError | None = None
        try:
            yield
        except MpitrainError as exc:
            error = exc
        failed = self.comm.allreduce(self.rank if error else self.size, op=MPI.MIN)
        if failed < self.size:
            if error is None:
                error = MpitrainError(f"rank {failed} failed during setup")
            error.reporter = failed
            raise error


@dataclass
class RankContext:
    """What one rank knows about the job it is part of.

    ``comm`` is the harness's own duplicate of COMM_WORLD.  ``xp`` is numpy or cupy.
    ``oversubscribed``: this node runs more ranks than the CPUs they may use together, so
    a rank waiting on a peer should leave the core soon rather than spin (set by ``connect``).
    ``guard``: the deadline-guarded native collectives on ``comm`` (set by ``connect``; see
    :mod:`mpitrain.comm.guarded`), with its own error channel there: every collective of a
    run outside the transport's checks goes through it, so a rank that dies or sticks is
    named by the others within ``deadline_s`` (the job's ``[faults] deadline_ms``).
    """

    comm: Any
    rank: int
    size: int
    xp: ModuleType
    slurm: SlurmInfo
    _blas_limits: Any = field(repr=False, default=None)
    oversubscribed: bool = False
    no_ulfm: str | None = "not checked"  # why :meth:`shrink` cannot work here (None: it can)
    deadline_s: float = 10.0
    guard: Any = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @classmethod
    def create(cls, world: World, cfg: JobConfig, env: dict[str, str]) -> "RankContext":
        """Set up this rank for ``cfg``: BLAS threads and array module (restored by close).

        Local only (no communication), so it may fail inside ``World.collective_errors``;
        call :meth:`connect` afterwards, on every rank, to get the communicator.
        """
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=cfg.run.blas_threads, user_api="blas")
        try:
            xp = array_module(cfg.run.device, world.local_rank)
        except BaseException:
            limits.restore_original_limits()
            raise
        return cls(comm=None, rank=world.rank, size=world.size, xp=xp,
                   slurm=SlurmInfo.from_env(env), _blas_limits=limits,
                   deadline_s=cfg.faults.deadline_ms / 1e3, no_ulfm=_ulfm_problem(env))

    def shrink(self) -> list[int]:
        """Collective over the surviving ranks, after a peer's death: revoke the harness's
        communicator (every rank still in a call on it gets MPI_ERR_REVOKED and comes here
        too), shrink it to the ranks alive, and continue on that.  Returns the ranks, in the
        old communicator's numbering, that are gone.  ``rank`` and ``size`` become the new
        ones.  The old communicator is left unfreed: freeing is collective, and the dead
        cannot take part.  Needs ULFM (:meth:`ulfm_problem` None).
        """
        MPI = mpi()
        old = self.comm
        old.Revoke()
        self.comm = old.Shrink()
        self.comm.Set_name("mpitrain")
        kept = MPI.Group.Translate_ranks(self.comm.Get_group(), list(range(self.comm.Get_size())),
                                         old.Get_group())
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        from .comm.guarded import GuardedComm  # the guarded collectives move with the comm
        self.guard = GuardedComm(self.comm, None, self.deadline_s, self.oversubscribed)
        return sorted(set(range(old.Get_size())) - set(kept))

    def sum_async(self, buf: Any) -> Any:
        """Start an in-place SUM of ``buf`` over all ranks; returns the MPI request."""
        MPI = mpi()
        return self.comm.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM)

    def sum(self, buf: Any, check: str, step: int | None) -> None:
        """Collective: ``buf`` (a host array) becomes its SUM over all ranks, in place.
        Deadline-guarded (:attr:`guard`): ``check`` and ``step`` name it in the error if a
        rank does not arrive."""
        buf[...] = self.guard.sum(buf, check, step)

    def connect(self, world: World) -> None:
        """Collective: duplicate COMM_WORLD into the harness's own communicator, find out
        whether this node is oversubscribed, and open the guarded collectives on it."""
        from .comm.guarded import GuardedComm, duplicate  # imports mpi4py.MPI: MPI_Init
        self.comm = duplicate(world.comm, self.deadline_s)
        self.comm.Set_name("mpitrain")
        self.oversubscribed = node_oversubscribed(self.comm)
        self.guard = GuardedComm(self.comm, None, self.deadline_s, self.oversubscribed)

    def close(self) -> None:
        """Close the duplicated communicator (collective: every rank calls it, last; the
        notices no rank waited for are taken, see mpitrain.comm.closing) and give the BLAS
        thread pools back their original sizes."""
        if self.comm is not None:
            from .comm.closing import close
            # Closing also meets: a shrunk job's ranks leave without MPI_Finalize
            # (mpitrain.recovery), which ULFM takes for a death, so no rank may leave while
            # its peers are still in a collective with it (MPI_ERR_PROC_FAILED).
            close(self.comm, self.deadline_s, spin_budget(0, self.oversubscribed))
            self.comm = self.guard = None
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
            self._blas_limits = None


def _ulfm_problem(env: dict[str, str]) -> str | None:
    """Why this process cannot survive a peer's death in place (None: it can); see
    :func:`mpitrain.mpi_profiles.ulfm_problem`."""
    from .mpi_profiles import ulfm_problem
    MPI = mpi()
    return ulfm_problem(MPI.Get_library_version(),
                        all(hasattr(MPI.Comm, name) for name in ("Revoke", "Shrink")), env)


def node_local_rank(comm: Any) -> int:
    """Collective: this rank's place among the ranks of ``comm`` on its node (0, 1, ...)."""
    node = comm.Split_type(mpi().COMM_TYPE_SHARED)
    try:
        return int(node.Get_rank())
    finally:
        node.Free()


def node_oversubscribed(comm) -> bool:
    """Collective: does this node run more ranks of ``comm`` than CPUs they may use?

    The CPUs are the union of the node's ranks' affinity masks, so ranks bound to one core
    each (srun --cpu-bind, mpiexec -bind-to) count as one core per rank, not as oversubscribed;
    a cgroup CPU quota (a container's ``--cpus``) lowers that count.
    """
    MPI = mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            list(range(os.cpu_count() or 1))
        masks_and_quotas = node.allgather((mine, _cgroup_cpus()))
        cpus = len(set().union(*(m for m, _ in masks_and_quotas)))
        quotas = [q for _, q in masks_and_quotas if q is not None]
        if quotas:  # a container's CPU quota (docker --cpus) does not show in the affinity
            cpus = min(cpus, max(1, math.ceil(min(quotas))))
        return node.Get_size() > cpus
    finally:
        node.Free()


def _cgroup_cpus(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs a cgroup quota allows this process (v2 ``cpu.max``, v1 CFS), None if none."""
    try:
        with open(f"{root}/cpu.max") as fh:
            limit, window = fh.read().split()[:2]
        return None if limit == "max" else int(limit) / int(window)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{root}/cpu/cpu.cfs_quota_us") as fq, \
                open(f"{root}/cpu/cpu.cfs_period_us") as fp:
            quota, period = int(fq.read()), int(fp.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
