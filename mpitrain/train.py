"""The training loop, top to bottom.

Every rank runs :func:`train` with the same config.  One step is:

    shard of the global batch  ->  forward  ->  loss  ->  backward, layer by layer,
    handing each layer's gradients to the synchronizer as they appear  ->  wait for the
    averaged gradients  ->  optimizer step  ->  metrics / checkpoint.

Ranks talk only through ``ctx.comm`` (the harness's own communicator): the gradient
allreduces, one small non-blocking allreduce of the step statistics (loss, accuracy, and
the "stop" flag of a preemption signal, so all ranks stop at the same step), and the replica
checks.  Resuming is checkpoint.py's business, the transport's report metrics.py's, the
stop signal the context's: this module is the loop.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np

from . import checkpoint, data, elastic, shard
from .backend import to_host
from .comm import traffic
from .comm.allreduce import wait_native
from .comm.checks import ranks_text
from .comm.guarded import GuardedComm
from .config import JobConfig
from .context import RankContext
from .errors import (DataError, DivergenceError, MpitrainError, NumericsError, Preempted,
                     ReductionError)
from .metrics import EventLog, Metrics, read_jsonl, report_fault_outcome, report_transport
from .model import MLP
from .model import build as build_model
from .optim import Optimizer, learning_rate
from .recovery import Recovery
from .stop_signal import StopSignal
from .sync import GradientSync, verify_replicas
from .sync import build as build_sync
from .trace import COMM


@dataclass
class Setup:
    """Everything a run needs, built once per rank before step 1."""

    out: Path
    dataset: data.Dataset
    sampler: shard.ShardSampler
    val_idx: np.ndarray
    model: MLP
    optim: Optimizer
    total_steps: int
    start_step: int
    warnings: list[tuple[int, str]] = field(default_factory=list)  # (step, message) let through
    identity: dict = field(default_factory=dict)  # what checkpoints record (resume_identity)


@dataclass(frozen=True)
class StartMode:
    """How a run starts in its output folder (the command line's --resume, --overwrite and
    --allow-change): continue the newest checkpoint, or start afresh -- refusing to replace
    an earlier run unless ``overwrite`` (see checkpoint.check_fresh_start)."""

    resume: bool = False
    overwrite: bool = False
    allow_changes: tuple[str, ...] = ()  # job keys a resume may change (patterns)


def train(ctx: RankContext, cfg: JobConfig, mode: StartMode = StartMode()) -> dict:
    """Set up and run the job ``cfg`` on this rank (collective: every rank calls it)."""
    return run(ctx, cfg, setup(ctx, cfg, mode), mode)


def run(ctx: RankContext, cfg: JobConfig, s: Setup, mode: StartMode = StartMode()) -> dict:
    """Collective: run the prepared job, first restoring the newest checkpoint if
    ``mode.resume``.  Returns a summary (steps, output folder, the last step's metrics).

    A fresh start with ``mode.overwrite`` moves the earlier run aside; if this run fails
    before its first checkpoint, the earlier run is put back.
    """
    identity = checkpoint.resume_identity(ctx.size, cfg, s.dataset.fingerprint,
                                          s.sampler.global_batch)
    resumed = checkpoint.Resumed(0, {}, ctx.size, s.sampler.global_batch)
    if mode.resume:
        resumed = checkpoint.restore(ctx, cfg, s.out, s.model, s.optim, identity,
                                     mode.allow_changes)
        s.start_step = resumed.step
        s.sampler, s.total_steps = elastic.continue_from(ctx, cfg, s.dataset, s.model,
                                                         s.sampler, s.total_steps, resumed)
        identity["data.global_batch"] = resumed.global_batch
    elif mode.overwrite:
        if ctx.is_root:
            checkpoint.set_aside(s.out)
        ctx.guard.barrier("moving the earlier run aside", 0)  # before any rank opens its files
    try:
        return _run(ctx, cfg, s, identity, resumed)
    except BaseException:
        if ctx.is_root and mode.overwrite and not mode.resume:
            checkpoint.put_back(s.out)
        raise


def _run(ctx: RankContext, cfg: JobConfig, s: Setup, identity: dict,
         resumed: checkpoint.Resumed) -> dict:
    """Collective: the run itself, its outputs opened and closed around the loop."""
    if ctx.is_root:
        checkpoint.drop_stale_rank_logs(s.out, ctx.size)
    metrics = Metrics(s.out, ctx.is_root, cfg.run.progress, s.total_steps, cfg.run.log_every,
                      s.start_step)
    s.identity = identity
    if ctx.is_root:
        checkpoint.write_text(s.out / "config.toml", cfg.to_toml())
        metrics.event("start", s.start_step, ranks=ctx.size, job=cfg.name,
                      slurm_job_id=ctx.slurm.job_id, slurm_restart_count=ctx.slurm.restart_count)
        if s.start_step:
            elastic.report_resume(ctx.size, s.sampler, metrics, resumed, cfg.faults.rules)
    log_path = s.out / f"faults-rank{ctx.rank}.jsonl"
    # A resumed run continues the same run: a rank that a "crash" rule killed before is
    # not killed again by it (a restart would otherwise meet the same crash forever).
    crashed = {e["rule"] for e in read_jsonl(log_path) if e.get("kind") == "crash"} \
        if s.start_step and log_path.exists() else set()
    fault_log = EventLog(log_path, append=s.start_step > 0)
    stop = StopSignal()
    sync = None
    try:
        sync = build_sync(ctx, cfg, s.out, s.model, fault_log, crashed)
        verify_replicas(sync.guard, [p.flat for p in s.model.params], s.start_step)
        # NaN/Inf are the harness's to find and name (see _loss_not_finite, sync.verify):
        # NumPy's own overflow warnings would only add noise, once per rank.
        with np.errstate(all="ignore"):
            summary, sync = _loop(ctx, cfg, s, sync, metrics, stop, fault_log)
        _report(ctx, cfg, s, sync, metrics)
    except BaseException as err:
        if sync is not None:
            sync.tracer.fail(err)  # this rank's part of the timeline: no collective now
        raise
    finally:
        if sync is not None:
            sync.close_ledger()
        stop.restore()
        metrics.close()
        fault_log.close()
    return summary


def _report(ctx: RankContext, cfg: JobConfig, s: Setup, sync: GradientSync,
            metrics: Metrics) -> None:
    """Collective, at the end: what the transport and the injected faults cost and did, the
    run's traffic per link (traffic.json, rank 0) and the timeline of chosen steps
    (trace.json, rank 0).  The transport is closed first, so these go through the rank's
    own guard (``ctx.guard``): a rank missing at the end is named, never waited for."""
    report_transport(ctx.guard, sync.close(), metrics, s.total_steps)
    report_fault_outcome(ctx.guard, sync.transport, metrics, s.total_steps,
                         cfg.faults.delivery, {step for step, _ in s.warnings})
    merged = traffic.gather(ctx.guard, sync.traffic, cfg.sync.algorithm, s.total_steps)
    if merged is not None:
        checkpoint.write_text(s.out / "traffic.json", "{\n" + ",\n".join(
            f" {json.dumps(k)}: {json.dumps(v)}" for k, v in merged.items()) + "\n}\n")
    sync.tracer.finish(ctx.guard, s.total_steps)


def setup(ctx: RankContext, cfg: JobConfig, mode: StartMode = StartMode()) -> Setup:
    """Data, sampler, model and optimizer for this rank, and (rank 0) whether the output
    folder may be started in.  Local: no communication, so a failure on one rank can be
    agreed on by all (``World.collective_errors``)."""
    out = cfg.out_dir(ctx.slurm.job_id)
    if ctx.is_root:
        checkpoint.check_writable(out)
        if not mode.resume:
            checkpoint.check_fresh_start(out, mode.overwrite)
    try:
        dataset = data.load(cfg.data, cfg.run.seed, ctx.rank, ctx.size)
        train_idx, val_idx = data.split(len(dataset.x), cfg.data.val_fraction, cfg.run.seed)
        data.check_values(dataset, val_idx, ctx.rank, ctx.size)
    except DataError as err:  # name the job file, like config errors do
        err.message = f"{cfg.path or 'built-in job'}: {err.message}"
        raise
    sampler, total = elastic.sampling(ctx, cfg, dataset, train_idx, None)
    model = build_model(cfg.model, dataset.features, cfg.run.seed, ctx.xp)
    elastic.check_plan(ctx, cfg, model, total, resuming=mode.resume)
    optim = Optimizer(cfg.optim, [p.flat for p in model.params], ctx.xp)
    return Setup(out, dataset, sampler, val_idx, model, optim, total, start_step=0)


def _loop(ctx: RankContext, cfg: JobConfig, s: Setup, sync: GradientSync, metrics: Metrics,
          stop: StopSignal, events: Callable[[dict], None]) -> tuple[dict, GradientSync]:
    """All steps from ``s.start_step + 1``; then the final check and ``model.npz``.  Returns
    the summary and the synchronizer in use at the end (a new one after a shrink).

    With ``[faults] recovery = "shrink"`` (and ULFM), a rank's death during a step or its
    step-end duties makes the survivors shrink and redo that step (see recovery.py); ``ctx``
    and ``s.sampler`` then describe the smaller world."""
    spe = s.sampler.steps_per_epoch
    epoch_sums = _epoch_so_far(metrics, s.start_step, spe)  # loss, correct, samples
    recovery = Recovery(ctx, cfg, s, metrics, events)
    order, order_epoch = np.empty(0, np.int64), -1  # the epoch's order: one for every size
    record: dict = {}
    last_epoch: dict = {}
    step = s.start_step + 1
    while step <= s.total_steps:
        epoch, k = divmod(step - 1, spe)
        if epoch != order_epoch:
            order, order_epoch = s.sampler.epoch_order(epoch), epoch
        recovery.keep(step)
        try:
            sync.tracer.begin_step(step)
            record, stop_now = _step(ctx, cfg, s, sync, metrics, step, epoch, k, order, stop)
            metrics.step(record)
            epoch_sums += (record["loss"] * record["samples"], record["correct"],
                           record["samples"])
            if k == spe - 1 or step == s.total_steps:
                last_epoch = _end_of_epoch(ctx, s, sync, metrics, step, epoch, epoch_sums)
                epoch_sums[:] = 0
            _end_of_step(ctx, cfg, s, sync, metrics, step, stop_now)
            sync.tracer.end_step(step)
        except recovery.catches as err:  # a rank died: the survivors redo the step
            step, sync = recovery.recover(err, step, sync)
            epoch_sums = _epoch_so_far(metrics, step - 1, spe)
            continue
        except MpitrainError as err:
            raise recovery.world_reporter(err)
        step += 1
    if ctx.is_root:
        checkpoint.write_npz(s.out / "model.npz", s.model.state())
    summary = {"steps": s.total_steps, "out": str(s.out), "loss": record.get("loss"),
               "val_loss": last_epoch.get("val_loss"),
               "val_accuracy": last_epoch.get("val_accuracy")}
    return summary, sync


def _end_of_step(ctx: RankContext, cfg: JobConfig, s: Setup, sync: GradientSync,
                 metrics: Metrics, step: int, stop_now: bool) -> None:
    """Collective step-end duties after the epoch's end: the replica check every
    ``check_every`` steps and after the last, a checkpoint and :class:`Preempted` after a stop signal (all ranks
    voted in the step's statistics), and the periodic and final checkpoints.

    They use native collectives, so first make sure no rank is failing inside the transport
    (it would leave the others waiting in MPI).
    """
    last = step == s.total_steps
    check = bool(cfg.sync.check_every) and step % cfg.sync.check_every == 0
    if check or stop_now or last:
        sync.fence(step)
    if check or last:  # the last step's is the final check of the run
        _checked(cfg, s, metrics, step, lambda: verify_replicas(
            sync.guard, [p.flat for p in s.model.params], step, sync.tracer))
    if stop_now and not last:  # on the last step, finishing is the best checkpoint
        _save_checkpoint(ctx, cfg, s, step)
        metrics.event("preempted", step)
        raise Preempted(f"stopped by a signal at step {step}; checkpoint written to "
                        f"{checkpoint.checkpoint_dir(s.out)}",
                        hint="run the same command with --resume to continue", reporter=0)
    if last or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
        with sync.tracer.span("checkpoint"):
            _save_checkpoint(ctx, cfg, s, step)


def _epoch_so_far(metrics: Metrics, start_step: int, spe: int) -> np.ndarray:
    """(loss x samples, correct, samples) of the epoch a resumed run re-enters mid-way, from
    the step records it kept (rank 0 writes them, and only rank 0 reports epochs)."""
    sums = np.zeros(3)
    epoch = start_step // spe
    for r in metrics.records():
        if r.get("kind") == "step" and r["epoch"] == epoch and r["step"] <= start_step:
            sums += (r["loss"] * r["samples"], r.get("correct", 0), r["samples"])
    return sums


def _step(ctx: RankContext, cfg: JobConfig, s: Setup, sync: GradientSync, metrics: Metrics,
          step: int, epoch: int, k: int, order: np.ndarray, stop: StopSignal
          ) -> tuple[dict, bool]:
    """One global step on this rank: (its metrics record, whether all ranks must stop now)."""
    model, tracer = s.model, sync.tracer
    t_start = time.perf_counter()
    # Forward and loss.  Each sample is weighted 1/n_global, so the gradients' SUM over
    # ranks (what the allreduce computes) is their mean over the global batch.
    with tracer.span("forward"):
        idx, n_global = s.sampler.shard(epoch, k, order)
        x, y = s.dataset.batch(idx, model.dtype, ctx.xp)
        out = model.forward(x)
        loss_sum, dz = model.loss(out, y, 1.0 / n_global)
        correct = model.correct(out, y) if s.dataset.classes is not None else 0
    # The step's statistics travel in one small allreduce that overlaps the backward pass;
    # the stop flag in it makes every rank stop at the same step after a signal, and the
    # count of ranks whose loss is not finite makes them all raise the same error.
    finite = bool(np.isfinite(loss_sum))
    stats = np.array([loss_sum, correct, len(idx), stop.requested, not finite], np.float64)
    stats_req = ctx.sum_async(stats)

    # Backward, handing each layer to the synchronizer as soon as it is ready.
    sync.begin(step)
    for layer in tracer.backward(model.backward(dz)):
        sync.layer_ready(layer)
    waited = sync.finish()
    t_wait = time.perf_counter()
    with tracer.span("wait for statistics", COMM, "wait"):
        wait_native(stats_req, cfg.faults.deadline_ms / 1e3, f"the statistics of step {step}",
                    oversubscribed=ctx.oversubscribed)
    waited += time.perf_counter() - t_wait
    if stats[4]:
        _loss_not_finite(sync.guard, s, step, float(loss_sum))
    # end-to-end checks (lossy delivery, fault plans), before the update
    _checked(cfg, s, metrics, step, lambda: sync.verify(step))

    lr = learning_rate(cfg.optim, step, s.total_steps)
    with tracer.span("optimizer"):
        s.optim.step([g.flat for g in model.grads], lr)
    total = time.perf_counter() - t_start
    loss, correct, samples, stop_votes, _ = stats
    record = {"step": step, "epoch": epoch, "loss": loss,
              "accuracy": correct / samples if s.dataset.classes is not None else None,
              "correct": int(correct), "lr": lr, "samples": int(samples),
              "time_compute": total - waited - sync.comm_s, "time_comm": sync.comm_s,
              "time_wait": waited, "time_total": total,
              "samples_per_s": samples / total, **sync.traffic.take_step()}
    return record, stop_votes > 0


def _checked(cfg: JobConfig, s: Setup, metrics: Metrics, step: int,
             check: Callable[[], None]) -> None:
    """Run a collective consistency check; with on_divergence = "warn", report and go on.

    The checks raise on every rank together, so every rank takes the same branch.  NaNs
    are never waved through: they would poison every replica at the next update.
    """
    try:
        check()
    except (DivergenceError, ReductionError) as err:
        if cfg.faults.on_divergence != "warn":
            raise
        s.warnings.append((step, err.message))
        metrics.event("divergence", step, message=err.message)
        metrics.note(f"mpitrain: warning: {err.message}")


def _loss_not_finite(guard: GuardedComm, s: Setup, step: int, loss: float) -> NoReturn:
    """Collective (every rank saw the count in the step's statistics): raise one error naming
    the ranks whose loss is NaN/Inf and, after replica warnings, the first of them."""
    losses = guard.allgather(loss, "the loss check", step)
    bad = [r for r, v in enumerate(losses) if not np.isfinite(v)]
    message = (f"{ranks_text(bad)}: the loss is {losses[bad[0]]} at step {step}")
    hint = "lower [optim] lr, or check the data for NaN/Inf"
    if s.warnings:
        first_step, first = s.warnings[0]
        message += (f", after {len(s.warnings)} replica warning(s) (on_divergence = \"warn\"); "
                    f"the first, at step {first_step}: {first}")
        hint = "the replicas drifted apart first: use delivery = \"reliable\" or \"strict\""
    raise NumericsError(message, hint=hint, reporter=0, step=step, ranks=bad)


def _end_of_epoch(ctx: RankContext, s: Setup, sync: GradientSync, metrics: Metrics, step: int,
                  epoch: int, sums: np.ndarray) -> dict:
    """Collective: validation, and the epoch's record (train figures: means over its samples).

    Fenced first: validation uses native collectives (see :func:`_end_of_step`)."""
    sync.fence(step)
    classify = s.dataset.classes is not None
    val_loss = val_acc = None
    if len(s.val_idx):
        val_loss, val_acc = evaluate(ctx, s.model, s.dataset, s.val_idx, step=step)
        val_acc = val_acc if classify else None
    n = max(sums[2], 1)
    record = {"step": step, "epoch": epoch, "loss": sums[0] / n,
              "accuracy": sums[1] / n if classify else None,
              "val_loss": val_loss, "val_accuracy": val_acc}
    metrics.epoch(record)
    return record


def evaluate(ctx: RankContext, model: MLP, dataset: data.Dataset, idx: np.ndarray,
             chunk: int = 1024, confusion: np.ndarray | None = None,
             step: int | None = None) -> tuple[float, float]:
    """Collective: (mean loss, accuracy) over ``idx``, each rank taking a contiguous part.

    ``confusion`` (classes x classes, integer zeros): gets the count of each (true class,
    predicted class) pair, rows true, summed over ranks.  ``step``: the training step of a
    validation (None: ``mpitrain evaluate``), which names the sums if a rank is missing."""
    part = np.array_split(idx, ctx.size)[ctx.rank]
    totals = np.zeros(3)
    for start in range(0, len(part), chunk):
        x, y = dataset.batch(part[start:start + chunk], model.dtype, ctx.xp)
        out = model.forward(x)
        loss_sum, _ = model.loss(out, y, 1.0)
        totals += (loss_sum, model.correct(out, y), len(x))
        if confusion is not None:
            np.add.at(confusion, (to_host(y.argmax(axis=1)), to_host(out.argmax(axis=1))), 1)
    what = "the evaluation" if step is None else "the validation"
    ctx.sum(totals, what, step)
    if confusion is not None:
        ctx.sum(confusion, what, step)
    return totals[0] / totals[2], totals[1] / totals[2]


def _save_checkpoint(ctx: RankContext, cfg: JobConfig, s: Setup, step: int) -> None:
    if ctx.is_root:
        meta = {"identity": s.identity, "job": cfg.name}
        checkpoint.save(s.out, step, {**s.model.state(), **s.optim.state_dict()}, meta,
                        cfg.run.keep_checkpoints)
