"""``mpitrain run -n P --restarts N [--min-ranks M]``: a run that lost a rank comes back.

After a rank's death or an unrecovered synchronization fault, the job is relaunched with
``--resume`` from its newest checkpoint, up to N times, after a growing pause (1, 2, 4 ...
30 s); each restart is a line on the terminal and a "restart" event in events.jsonl.  A bug
(1), bad input (2), a preemption (75) and a job stopped by a signal to the launcher
(Ctrl-C, SIGTERM) are never retried; any other failure -- a synchronization fault (3), a
crashed or killed rank, whatever status the MPI launcher makes of it -- is.

The size of the relaunch (the policy):

* without ``--min-ranks``, always P: a rank that died is replaced by a fresh process;
* with ``--min-ranks M``, a rank that died is *lost*: the relaunch runs on the ranks that
  are left, never fewer than M.  A rank that died is one that ended without reporting its
  status to the supervisor (killed by a signal, crashed, or stopped when stuck); the ranks
  that ended on the job's error report theirs (see context.World), so a synchronization
  fault with every rank alive relaunches at the same size.  When no rank reported at all
  (MPI's launcher took the whole job down at once: MPICH 5.0.2's hydra, even with
  -disable-auto-cleanup, ends every rank left as soon as another exits after one was
  killed, so two ranks killed at once leave no survivor to report) the supervisor only
  knows that one died: one is lost.  The count
  errs on the safe side: a survivor that MPI or the supervisor ended before it could
  report (an MPI_Abort, a rank stuck in a collective) counts as lost too.  A relaunch
  that fails to start counts as a restart, and the ranks
  that did not come up are lost too.  Fewer left than M: one message, the job's status,
  no further launch.  A run never grows back: no rank ever waits for a newcomer to join.

The relaunched run resumes on its new rank count with the checkpoint's global batch
(mpitrain.elastic), so it continues the same mathematics.

Under Slurm (``--srun PMI``, what jobs/slurm/*.sbatch run): each launch is a new srun step
of the batch job's allocation, its ranks reporting into a folder inside the run folder
(shared by the nodes); the policy is the same.  A rank on a node that failed, in a job
submitted with --no-kill, does not report either: it is lost, and the relaunch's smaller
step goes where the allocation still has room.

A job with ``[faults] recovery = "shrink"`` is launched with ULFM where the MPI's launcher
profile has it (Open MPI: ``--with-ft ulfm``, TCP), so its survivors go on in place; a run
that did, and completed, exits 0.  Elsewhere (MPICH, Intel MPI) it is launched as any other,
and its rank 0 says, once, that recovery is not available (mpitrain.recovery).  A shrink run
that ends anyway (fewer ranks left than ``[faults] min_ranks``, say) is restarted like any
other failed run.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from . import config, jobs, launch
from .checkpoint import list_checkpoints
from .context import environment
from .errors import PREEMPTED_EXIT, ConfigError, LaunchError
from .mpi_profiles import LaunchOptions, current_profile

NOT_RETRIED = (0, 1, 2, PREEMPTED_EXIT, 130)  # success, a bug, bad input, preempted, Ctrl-C
PAUSE_MAX_S = 30.0


@dataclass(frozen=True)
class Ending:
    """How one launch of ``size`` ranks ended: its exit ``status``, the ranks that came up
    (``started``) and those that reported their own status on the way out."""

    status: int
    size: int
    started: frozenset[int]
    reported: frozenset[int]
    start_failed: bool = False

    @property
    def lost(self) -> int:
        """How many ranks died (see the module docstring)."""
        if self.start_failed:
            return max(1, self.size - len(self.started))
        return self.size - len(self.reported) if self.reported else 1


@dataclass(frozen=True)
class RestartPolicy:
    """``--restarts N`` and ``--min-ranks M`` (None: never shrink) of a job of ``size`` ranks."""

    restarts: int
    min_ranks: int | None
    size: int

    def check(self) -> None:
        """Bad values: one message naming the flag and what is allowed."""
        if self.restarts < 0:
            raise ConfigError(f"--restarts {self.restarts}: must be >= 0")
        if self.min_ranks is None:
            return
        if not self.restarts:
            raise ConfigError(f"--min-ranks {self.min_ranks} needs --restarts N: it says how "
                              f"few ranks a relaunch may run on",
                              hint=f"use `mpitrain run -n {self.size} JOB --restarts N "
                                   f"--min-ranks {self.min_ranks}`")
        if not 1 <= self.min_ranks <= self.size:
            raise ConfigError(f"--min-ranks {self.min_ranks}: must be between 1 and the job's "
                              f"{self.size} ranks (-n)")

    def next_size(self, ending: Ending) -> int:
        """The relaunch's rank count: the same without --min-ranks, else the ranks left
        (below M: 0, no relaunch)."""
        if self.min_ranks is None:
            return ending.size
        left = ending.size - ending.lost
        return left if left >= self.min_ranks else 0


def launch_run(nprocs: int, job: str | None, overrides: list[str], faults: list[str],
               start_flags: list[str], restarts: int = 0,
               min_ranks: int | None = None, options: LaunchOptions = LaunchOptions(),
               srun: str | None = None) -> NoReturn:
    """Run ``mpitrain run`` with these arguments under ``mpiexec -n NPROCS`` -- or, with
    ``srun`` (a PMI), as a step of the Slurm allocation this runs in (:func:`srun_command`);
    exit with the job's status (``start_flags``: --resume, --overwrite, --allow-change KEY,
    passed on as they are; ``options``: hosts, launcher arguments).  With ``restarts``,
    relaunch with --resume after a death or a sync fault, on the ranks the policy (module
    docstring) gives."""
    policy = RestartPolicy(restarts, min_ranks, nprocs)
    policy.check()
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
    out = cfg.out_dir(environment().get("SLURM_JOB_ID"))
    options = recovery_options(cfg, options)
    launcher = _Launcher(srun, out, options)
    ending = launcher.launch(nprocs, argv + start_flags)
    resume = [f for f in start_flags if f != "--overwrite"]
    resume += [] if "--resume" in resume else ["--resume"]
    for attempt in range(1, restarts + 1):
        if (ending.status in NOT_RETRIED and not ending.start_failed) or launch.signalled():
            break
        size = policy.next_size(ending)
        _record_restart(out, attempt, ending, size)
        if not size:
            print(f"mpitrain: error: {ending.lost} of {ending.size} ranks died and "
                  f"{ending.size - ending.lost} are left, fewer than --min-ranks "
                  f"{min_ranks}: not restarted; the run can continue from its newest "
                  f"checkpoint with --resume", file=sys.stderr, flush=True)
            break
        pause = min(PAUSE_MAX_S, 2.0 ** (attempt - 1))
        on = f" on {size} ranks ({ending.lost} lost)" if size != ending.size else ""
        print(f"mpitrain: restart {attempt} of {restarts} in {pause:g} s{on}: the run ended "
              f"with status {ending.status}; resuming from its newest checkpoint",
              file=sys.stderr, flush=True)
        time.sleep(pause)
        ending = launcher.launch(size, argv + resume, relaunch=True)
    sys.exit(ending.status)


def recovery_options(cfg: config.JobConfig, options: LaunchOptions) -> LaunchOptions:
    """``options`` with ULFM asked for when the job recovers in place (``recovery =
    "shrink"``) and the MPI's launcher profile has it; otherwise as they are (no message
    here: the job's rank 0 says that recovery is not available and why)."""
    if cfg.faults.recovery != "shrink" or current_profile().ulfm_args is None:
        return options
    return dataclasses.replace(options, fault_tolerant=True)


def srun_command(size: int, python_args: list[str], pmi: str) -> list[str]:
    """``srun --mpi=PMI -n SIZE python PYTHON_ARGS``: SIZE ranks as a new step of the Slurm
    allocation this process runs in (a batch script's), wherever Slurm has room for them --
    on the nodes left, once one has failed in a job submitted with --no-kill.
    --kill-on-bad-exit=0 (whatever the site's KillOnBadExit): when one rank dies, the others
    live on to report their status, as with mpiexec below."""
    if size < 1:
        raise ConfigError(f"-n {size}: the number of ranks must be >= 1")
    if shutil.which("srun") is None:
        raise LaunchError("--srun: no srun on PATH", hint="--srun starts the ranks inside a "
                          "Slurm allocation (see jobs/slurm/train.sbatch)")
    return ["srun", f"--mpi={pmi}", "-n", str(size), "--kill-on-bad-exit=0", sys.executable,
            *python_args]


@dataclass(frozen=True)
class _Launcher:
    """Launches the job's ranks: under mpiexec (``srun`` None), or as a Slurm step with the
    PMI ``srun``, its ranks reporting into the run folder ``out`` (shared by the nodes)."""

    srun: str | None
    out: Path
    options: LaunchOptions

    def launch(self, size: int, python_args: list[str], relaunch: bool = False) -> Ending:
        """One launch under supervision; how it ended.  A relaunch that fails to start is an
        ending too (the first launch's failure is the user's to fix: it raises)."""
        records: dict[str, str] = {}
        try:
            if self.srun is None:
                # keep_survivors: the other ranks stay alive when one dies, so they can say
                # which one did -- and report their own status, which tells the policy who
                # is left (hydra's default kills them all at once, silently).
                status = launch.run_under_mpiexec(size, python_args, keep_survivors=True,
                                                  options=self.options, records=records)
            else:
                self.out.mkdir(parents=True, exist_ok=True)
                status = launch.run_supervised(srun_command(size, python_args, self.srun),
                                               environment(), size, records, self.out)
        except LaunchError as err:
            if not relaunch:
                raise
            print(f"mpitrain: error: {err}", file=sys.stderr, flush=True)
            status, failed = err.exit_code, True
        else:
            failed = False
        ranks = {kind: frozenset(int(name.split("-")[1]) for name in records
                                 if name.startswith(f"{kind}-"))
                 for kind in ("started", "exit", "done")}
        return Ending(status, size, ranks["started"], ranks["exit"] | ranks["done"], failed)


def _record_restart(out: Path, attempt: int, ending: Ending, size: int) -> None:
    """A "restart" event in the run's events.jsonl (the resumed run keeps the records up to
    its step): the attempt, the status it follows, the ranks lost and the relaunch's size
    (0: fewer left than --min-ranks, not relaunched)."""
    found = list_checkpoints(out)
    step = int(found[-1].stem.split("-")[1]) if found else 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "restart", "step": step, "attempt": attempt,
                             "previous_status": ending.status, "ranks_before": ending.size,
                             "lost": ending.lost, "ranks": size, "t": time.time()}) + "\n")
