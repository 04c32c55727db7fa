"""RankContext: the one module that reads MPI.COMM_WORLD and the environment.

Everything else in mpitrain is handed a :class:`RankContext` (or plain values taken from
it).  That keeps the rest testable without MPI and makes every global input visible here:

* the process environment (``MPITRAIN_*`` settings, Slurm variables, launcher variables);
* ``MPI.COMM_WORLD``, of which the harness only ever uses a *duplicate*, so its messages
  can never match those of user code or of another library on the same processes;
* the BLAS thread pool (one thread per rank by default: ranks of several BLAS threads
  each fight over the cores and run 3-10x slower);
* the array module ``xp``: NumPy on the CPU, CuPy on the GPU (see backend.py), the GPU
  chosen by the rank's place on its node;
* the process's signals: a preemption signal becomes a flag the loop reads (StopSignal).
"""
from __future__ import annotations

import math
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, Iterator

from .backend import array_module
from .comm.waiting import Waiter
from .errors import LaunchError, MpitrainError

if TYPE_CHECKING:
    from .config import JobConfig

# Variables that launchers set to the size of the job they started.  If one says P > 1
# but MPI sees a world of 1, each process was started by a launcher that does not belong
# to the MPI library mpi4py was built against: P independent rank-0 jobs.
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
                      "SLURM_STEP_NUM_TASKS", "PMI_NUM_RANKS")


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
    """The MPI module, initialised on first use (importing mpi4py.MPI calls MPI_Init)."""
    from mpi4py import MPI
    return MPI


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
        self.comm = mpi().COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local_rank = node_local_rank(self.comm)
        launch_dir = env.get(LAUNCH_DIR_VAR)
        self.launch_dir = Path(launch_dir) if launch_dir else None
        self._tell_launcher(f"started-{self.rank}", "")

    def record_exit(self, code: int) -> None:
        """Tell ``mpitrain run -n``'s supervisor the status this rank ends with (it makes
        the job's status from the ranks' own, see mpitrain.launch)."""
        self._tell_launcher(f"exit-{self.rank}", str(code))

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
            hint="launch with the mpiexec that belongs to mpi4py (or `mpitrain run -n P JOB`), "
                 "or under Slurm with the matching PMI: srun --mpi=pmi2 for the MPICH wheel, "
                 "srun --mpi=pmix for Open MPI")

    def all_present(self, timeout: float) -> bool:
        """Collective barrier that gives up after ``timeout`` seconds: are all ranks alive?

        Used on the way out after an error that every rank raised: a dead rank must not
        make the others wait forever.
        """
        return Waiter(timeout).wait_for(self.comm.Ibarrier())

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
    """

    comm: Any
    rank: int
    size: int
    xp: ModuleType
    slurm: SlurmInfo
    _blas_limits: Any = field(repr=False, default=None)
    oversubscribed: bool = False

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
                   slurm=SlurmInfo.from_env(env), _blas_limits=limits)

    def sum_async(self, buf: Any) -> Any:
        """Start an in-place SUM of ``buf`` over all ranks; returns the MPI request."""
        MPI = mpi()
        return self.comm.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM)

    def sum(self, buf: Any) -> None:
        """Collective: ``buf`` becomes its SUM over all ranks (in place, blocking)."""
        MPI = mpi()
        self.comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)

    def connect(self, world: World) -> None:
        """Collective: duplicate COMM_WORLD into the harness's own communicator, and find
        out whether this node is oversubscribed."""
        self.comm = world.comm.Dup()
        self.comm.Set_name("mpitrain")
        self.oversubscribed = node_oversubscribed(self.comm)

    def close(self) -> None:
        """Free the duplicated communicator (collective: every rank calls it) and give the
        BLAS thread pools back their original sizes."""
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
            self._blas_limits = None


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


class StopSignal:
    """Turns SIGTERM/SIGUSR1 (preemption, Slurm's --signal) into a flag read at step ends.

    Installed for the training loop and removed by :meth:`restore`; a second signal before
    the step boundary kills the process the default way.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = 0
        self._old: dict[int, Any] = {}
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # asked twice: the step boundary is not coming, stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = 1

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
