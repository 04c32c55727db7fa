"""Surviving a rank's death in place (``[faults] recovery = "shrink"``, needs ULFM).

The replicas are copies: losing one rank loses no state, only that rank's share of the work.
So when a rank dies, the survivors

1. notice: an MPI call on the harness's communicator fails with MPI_ERR_PROC_FAILED (or
   MPI_ERR_REVOKED, once a peer has revoked it), or the transport's deadline fires;
2. revoke the communicator (every survivor still inside a call on it fails too and joins),
   shrink it to the ranks alive (ULFM's agreement on who is left), and continue on that
   (:meth:`mpitrain.context.RankContext.shrink`);
3. agree on the step to redo -- the earliest any survivor was in: a collective can complete
   on some ranks and fail on others, so one may be a step ahead -- and put back the
   parameters and optimizer state each kept from that step's start (:class:`StepStart`),
   then check that the replicas are equal;
4. split the same global batch among themselves (``ShardSampler.resized``: samples weigh
   1/n_global and gradients are summed, so an uneven split is exact), build a new
   synchronizer on the new communicator, and train on.

Nothing restarts and no checkpoint is read: the final parameters equal an uninterrupted
run's to float rounding.  A death during steps 2-3 shrinks again; fewer survivors than
``[faults] min_ranks``, or a failure that killed nobody (a fault plan's dropped message under
strict delivery, say), ends the job with one error, as without recovery.

Under ``mpitrain run -n P`` each survivor also leaves the ranks lost so far (original
numbering) in the supervisor's launch folder (``lost-RANK``), so that a run that went on
without them and completed is a success there, not a crash (mpitrain.launch).

After a shrink, ranks are renumbered (the survivors keep their order); :attr:`world_ranks`
maps the new numbers to the original ones, in which errors are reported and fault rules
(:func:`remap_rules`) keep addressing ranks.  The collective ledger and the trace timeline
are per original rank, so they stop at the first shrink.  Without ULFM (the MPICH wheel, or
Open MPI launched without ``--with-ft ulfm``) rank 0 says so once, and a death ends the run
as before (``mpitrain run -n P --restarts N`` relaunches it).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from .comm.checks import ranks_text
from .context import LAUNCH_DIR_VAR, environment, mpi
from .errors import MpitrainError, SyncError
from .schema import FaultRule
from .sync import GradientSync, verify_replicas
from .sync import build as build_sync

if TYPE_CHECKING:
    from .config import JobConfig
    from .context import RankContext
    from .metrics import Metrics
    from .model import MLP
    from .optim import Optimizer
    from .train import Setup


def _leave_without_finalize() -> None:
    """At a normal exit after a shrink: end the process without MPI_Finalize, which can wait
    forever on the dead and the revoked communicator (measured: 2 of 3 runs with two ranks
    killed at once hung there after training had finished).  Registered with atexit, so it
    runs before mpi4py's own finalization; errors already leave by ``os._exit``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def peer_failure_classes() -> tuple[int, ...]:
    """The MPI error classes that say a peer died or a survivor revoked the communicator."""
    MPI = mpi()
    return MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED


class StepStart:
    """The replica's state (parameters, optimizer slots and step count) at the start of the
    last two steps, kept in place (two preallocated copies, reused)."""

    def __init__(self, model: MLP, optim: Optimizer):
        self.optim = optim
        self.live = [p.flat for p in model.params] + \
            [a for slot in optim.state.values() for a in slot]
        self.kept: dict[int, tuple[list, int]] = {}

    def keep(self, step: int) -> None:
        """Copy the current state as the start of ``step`` (call before the step begins)."""
        older = [s for s in self.kept if s < step - 1 or s == step]
        copies = self.kept.pop(older[0])[0] if older else [a.copy() for a in self.live]
        for s in older[1:]:
            del self.kept[s]
        for copy, live in zip(copies, self.live):
            copy[...] = live
        self.kept[step] = (copies, self.optim.t)

    def restore(self, step: int) -> None:
        """Put back the state at the start of ``step`` (one of the last two kept)."""
        copies, t = self.kept[step]
        for copy, live in zip(copies, self.live):
            live[...] = copy
        self.optim.t = t


def remap_rules(rules: list[FaultRule], world_ranks: list[int]) -> list[FaultRule]:
    """The fault rules on the shrunk communicator: the ranks they name (rank, src, dst, in
    the original numbering) renumbered to the survivors' new ranks; a rule naming a dead
    rank is dropped (a crash rule that fired is among them)."""
    new_rank = {world: new for new, world in enumerate(world_ranks)}
    kept = []
    for rule in rules:
        named: dict[str, Any] = {k: getattr(rule, k) for k in ("rank", "src", "dst")
                                 if getattr(rule, k) is not None}
        if all(r in new_rank for r in named.values()):
            renumbered: dict[str, Any] = {k: new_rank[r] for k, r in named.items()}
            kept.append(dataclasses.replace(rule, **renumbered))
    return kept


class Recovery:
    """The loop's side of in-place recovery, one per run (see the module docstring).

    ``catches`` is the tuple of exceptions the loop hands to :meth:`recover` (empty when
    recovery is off or unavailable); call :meth:`keep` before each step.
    """

    def __init__(self, ctx: RankContext, cfg: JobConfig, s: Setup, metrics: Metrics,
                 events: Callable[[dict], None]):
        self.ctx, self.cfg, self.s, self.metrics, self.events = ctx, cfg, s, metrics, events
        self.world_ranks = list(range(ctx.size))
        self.world_ranks_shrunk = False
        self.lost: list[int] = []  # every rank lost so far, original numbering
        wanted = cfg.faults.recovery == "shrink"
        self.on = wanted and ctx.no_ulfm is None and ctx.size > 1
        # Any error: a peer that dies mid-collective can also leave garbage where a result
        # should be (measured: an unpickling error in a pickled allgather); recover() shrinks
        # to find out whether someone died, and re-raises the error if nobody did.
        self.catches: tuple[type[BaseException], ...] = (Exception,) if self.on else ()
        self.state = StepStart(s.model, s.optim) if self.on else None
        if wanted and ctx.no_ulfm is not None:
            metrics.note(f"mpitrain: recovery = \"shrink\" is not available: {ctx.no_ulfm}; a "
                         f"rank's death ends the run (`mpitrain run -n P --restarts N` "
                         f"relaunches it from the newest checkpoint)")
            metrics.event("recovery unavailable", s.start_step, reason=ctx.no_ulfm)

    def keep(self, step: int) -> None:
        """Keep the replica's state at the start of ``step``, to redo it after a death."""
        if self.state is not None:
            self.state.keep(step)

    def world_reporter(self, err: MpitrainError) -> MpitrainError:
        """``err`` (raised by every rank, outside recovery) with its reporter renumbered to
        the original ranks, the numbering the exit path prints by."""
        if err.reporter is not None:
            err.reporter = self.world_ranks[err.reporter]
        return err

    def recover(self, err: BaseException, step: int, sync: GradientSync
                ) -> tuple[int, GradientSync]:
        """Collective over the survivors, after ``err`` interrupted ``step`` on this rank:
        shrink, agree, put back the state, re-shard; (the step to redo, the new
        synchronizer).  Raises when recovery is not possible (see the module docstring)."""
        # Any MPI error is checked by shrinking, whatever its class: Open MPI's non-blocking
        # collectives report a peer's death as their schedule's failure (seen: "NBC_Progress:
        # an error 75 was found"), and a shrink that finds nobody dead raises ``err`` again.
        if isinstance(err, MpitrainError) and not isinstance(err, SyncError):
            raise self.world_reporter(err)  # a stop signal, bad input: no death to recover
        t0 = time.monotonic()
        lost: list[int] = []
        while True:  # each round loses a rank, or raises
            try:
                redo = self._shrink_and_agree(err, step, lost)
                break
            except MpitrainError:
                raise
            except Exception as again:  # a death during recovery itself: shrink again
                if isinstance(again, mpi().Exception) and \
                        again.Get_error_class() not in peer_failure_classes():
                    raise
                err = again
        if not self.world_ranks_shrunk:
            atexit.register(_leave_without_finalize)
            self.world_ranks_shrunk = True
        sync.close_ledger()
        s, ctx = self.s, self.ctx
        s.sampler = s.sampler.resized(ctx.rank, ctx.size)
        new_sync = build_sync(ctx, self._shrunk_config(), s.out, s.model, self.events)
        took = time.monotonic() - t0
        self.lost += lost
        self._tell_launcher()
        self.metrics.rewind(redo - 1, ctx.is_root)
        self.metrics.event("shrink", redo, lost=lost, ranks=ctx.size, recover_s=round(took, 4))
        self.metrics.note(f"mpitrain: {ranks_text(lost)} died in step {redo}; {ctx.size} ranks "
                          f"redo it and train on (recovered in place in {took:.2f} s)")
        return redo, new_sync

    def _tell_launcher(self) -> None:
        """Leave the ranks lost so far in ``mpitrain run -n``'s launch folder, as
        ``lost-RANK`` (this rank's original number) holding them space-separated; without a
        supervisor, nothing."""
        launch_dir = environment().get(LAUNCH_DIR_VAR)
        if not launch_dir:
            return
        try:
            name = f"lost-{self.world_ranks[self.ctx.rank]}"
            with open(os.path.join(launch_dir, name), "w") as fh:
                fh.write(" ".join(map(str, self.lost)))
        except OSError:  # the supervisor is gone: nobody to tell
            pass

    def _shrink_and_agree(self, err: BaseException, step: int, lost: list[int]) -> int:
        """Shrink (adding the dead, original numbering, to ``lost``; if nobody died, raise
        ``err``), check what is left, put back the state of the step to redo and verify the
        replicas; returns that step."""
        MPI, ctx = mpi(), self.ctx
        gone = ctx.shrink()
        lost += [self.world_ranks[r] for r in gone]
        self.world_ranks = [w for i, w in enumerate(self.world_ranks) if i not in gone]
        if not gone:
            self._nobody_died(err)
        if ctx.size < self.cfg.faults.min_ranks:
            raise SyncError(f"{ranks_text(lost)} died; {ctx.size} rank(s) are left, fewer than "
                            f"[faults] min_ranks = {self.cfg.faults.min_ranks}",
                            hint="lower [faults] min_ranks, or relaunch on more ranks with "
                                 "--resume", reporter=self.world_ranks[0], step=step, ranks=lost)
        redo = ctx.comm.allreduce(step, op=MPI.MIN)
        assert self.state is not None
        self.state.restore(redo)
        verify_replicas(ctx.guard, [p.flat for p in self.s.model.params], redo - 1)
        return redo

    def _nobody_died(self, err: BaseException) -> NoReturn:
        """Every rank is alive: the failure was no death.  Raise the synchronization error
        some rank saw (the lowest), on every rank, as recovery = "abort" would have; if no
        rank saw one (a bug), each raises its own error (the bug's rank aborts the job)."""
        seen = self.ctx.comm.allgather(err if isinstance(err, MpitrainError) else None)
        reporter = next((r for r, e in enumerate(seen) if e is not None), None)
        if reporter is None:
            raise err
        first: MpitrainError = seen[reporter]
        first.reporter = self.world_ranks[reporter if first.reporter is None else first.reporter]
        raise first

    def _shrunk_config(self) -> JobConfig:
        """The job as the survivors run it: fault rules renumbered, no ledger, no trace."""
        cfg = self.cfg
        faults = dataclasses.replace(cfg.faults,
                                     rules=remap_rules(cfg.faults.rules, self.world_ranks))
        return dataclasses.replace(cfg, faults=faults,
                                   sync=dataclasses.replace(cfg.sync, ledger=False),
                                   trace=dataclasses.replace(cfg.trace, steps=""))
