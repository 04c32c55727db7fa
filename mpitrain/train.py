"""The training loop, top to bottom.

Every rank runs :func:`train` with the same config.  One step is:

    shard of the global batch  ->  forward  ->  loss  ->  backward, layer by layer,
    handing each layer's gradients to the synchronizer as they appear  ->  wait for the
    averaged gradients  ->  optimizer step  ->  metrics / checkpoint.

Ranks talk only through ``ctx.comm`` (the harness's own communicator): the gradient
allreduces, one small non-blocking allreduce of the step statistics (loss, accuracy, and
the "stop" flag of a preemption signal, so all ranks stop at the same step), and the replica
checks.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mpi4py import MPI

from . import checkpoint, data
from .comm.allreduce import wait_native
from .comm.checks import ReductionError
from .errors import ConfigError, DataError, DivergenceError, MpitrainError, NumericsError
from .metrics import EventLog, Metrics
from .model import MLP
from .model import build as build_model
from .optim import Optimizer, learning_rate
from .sync import GradientSync, verify_replicas
from .sync import build as build_sync

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume me


class Preempted(MpitrainError):
    """A preemption signal arrived; every rank checkpointed at the same step."""

    exit_code = PREEMPTED_EXIT


@dataclass
class Setup:
    """Everything a run needs, built once per rank before step 1."""

    out: Path
    dataset: data.Dataset
    sampler: data.ShardSampler
    val_idx: np.ndarray
    model: MLP
    optim: Optimizer
    total_steps: int
    start_step: int


def train(ctx, cfg, resume: bool = False) -> dict:
    """Set up and run the job ``cfg`` on this rank (collective: every rank calls it)."""
    return run(ctx, cfg, setup(ctx, cfg), resume)


def run(ctx, cfg, s: "Setup", resume: bool = False) -> dict:
    """Collective: run the prepared job, first restoring the newest checkpoint if ``resume``.

    Returns a summary (steps, output folder, the last step's metrics).
    """
    if resume:
        s.start_step = _restore(ctx, cfg, s.out, s.model, s.optim)
    elif ctx.is_root:
        _forget_earlier_run(s.out, ctx.size)
    metrics = Metrics(s.out, ctx.is_root, cfg.run.progress, s.total_steps, cfg.run.log_every,
                      s.start_step)
    if ctx.is_root:
        checkpoint.write_text(s.out / "config.toml", cfg.to_toml())
        metrics.event("start", s.start_step, ranks=ctx.size, job=cfg.name,
                      slurm_job_id=ctx.slurm.job_id, slurm_restart_count=ctx.slurm.restart_count)
        if s.start_step:
            metrics.note(f"resumed from the checkpoint of step {s.start_step}")
            metrics.event("resume", s.start_step)
    fault_log = EventLog(s.out / f"faults-rank{ctx.rank}.jsonl", append=s.start_step > 0)
    stop = _StopSignal()
    try:
        verify_replicas(ctx.comm, [p.flat for p in s.model.params], s.start_step)
        sync = build_sync(ctx, cfg, s.out, s.model, fault_log)
        summary = _loop(ctx, cfg, s, sync, metrics, stop)
        _report_transport(ctx, sync.close(), metrics, s.total_steps)
    finally:
        stop.restore()
        metrics.close()
        fault_log.close()
    return summary


def setup(ctx, cfg) -> Setup:
    """Data, sampler, model and optimizer for this rank.  Local: no communication, so a
    failure on one rank can be agreed on by all (``World.collective_errors``)."""
    out = cfg.out_dir(ctx.slurm.job_id)
    try:
        dataset = data.load(cfg.data, cfg.run.seed)
        train_idx, val_idx = data.split(len(dataset.x), cfg.data.val_fraction, cfg.run.seed)
        _check_fits(cfg, dataset, len(train_idx), ctx.size)
    except DataError as err:  # name the job file, like config errors do
        err.message = f"{cfg.path or 'built-in job'}: {err.message}"
        raise
    sampler = data.ShardSampler(train_idx, cfg.data.batch_size, ctx.rank, ctx.size, cfg.run.seed,
                                cfg.data.shuffle, cfg.data.tail)
    total = cfg.run.steps or cfg.epochs * sampler.steps_per_epoch
    model = build_model(cfg.model, dataset.features, cfg.run.seed, ctx.xp)
    _check_fault_rules(cfg, ctx.size, model, total)
    optim = Optimizer(cfg.optim, [p.flat for p in model.params], ctx.xp)
    return Setup(out, dataset, sampler, val_idx, model, optim, total, start_step=0)


def _check_fits(cfg, dataset: data.Dataset, n_train: int, size: int) -> None:
    width = cfg.model.layers[-1]
    if dataset.target_width != width:
        what = (f"{dataset.classes} classes" if dataset.classes is not None
                else f"targets of width {dataset.target_width}")
        raise DataError(f"[model] layers ends with {width} outputs but the data "
                        f"({dataset.name}) has {what}",
                        hint=f"set the last entry of [model] layers to {dataset.target_width}")
    if n_train < size:
        raise DataError(f"{size} ranks but only {n_train} training samples: every rank needs "
                        f"at least one", hint="use fewer ranks or more data")
    global_batch = cfg.data.batch_size * size
    if cfg.data.tail == "drop" and n_train < global_batch:
        raise DataError(f"the global batch ({size} ranks x batch_size {cfg.data.batch_size} = "
                        f"{global_batch}) is larger than the {n_train} training samples, so "
                        f"tail = \"drop\" leaves no step",
                        hint="lower [data] batch_size, use fewer ranks, or set "
                             "[data] tail = \"weighted\"")


def _check_fault_rules(cfg, size: int, model, total_steps: int) -> None:
    """Fault rules must be able to hit something in this job; say why not if they can't."""
    import dataclasses
    from .comm.faults import ALGORITHM_PHASES, COLLECTIVE_KINDS, MESSAGE_KINDS, plan_from_config
    n_layers = model.n_layers
    buckets = model.buckets(cfg.sync.bucket_bytes)
    where = f"{cfg.path or 'built-in job'}: [[faults.rules]]"
    try:
        plan_from_config([dataclasses.asdict(r) for r in cfg.faults.rules], cfg.faults.seed)
    except ConfigError as err:
        err.message = f"{where}: {err.message}"
        raise
    alg = cfg.sync.algorithm
    for i, rule in enumerate(cfg.faults.rules):
        label = f"{where} rule {i} (kind = \"{rule.kind}\")"
        for key in ("src", "dst", "rank"):
            value = getattr(rule, key)
            if value is not None and value >= size:
                raise ConfigError(f"{label}: {key} = {value}, but the job has {size} ranks "
                                  f"(0..{size - 1})")
        if rule.step is not None and rule.step > total_steps:
            raise ConfigError(f"{label}: step = {rule.step}, but the run has {total_steps} steps")
        ignored = ([k for k in ("phase", "chunk", "dst") if getattr(rule, k) is not None]
                   if rule.kind in COLLECTIVE_KINDS else
                   (["rank"] if rule.rank is not None else []))
        if ignored:
            raise ConfigError(f"{label}: {', '.join(ignored)} cannot apply to this kind: "
                              f"{'crash and slow act on a rank at the start of a collective' if rule.kind in COLLECTIVE_KINDS else 'message faults pick messages by src and dst'}",
                              hint="remove the key, or use another kind")
        if rule.layer is not None and rule.layer >= n_layers:
            raise ConfigError(f"{label}: layer = {rule.layer}, but the model has {n_layers} "
                              f"layers (0..{n_layers - 1}, from the input side)")
        fused = next(((lo, hi) for lo, hi in buckets if lo < rule.layer <= hi), None) \
            if rule.layer is not None else None
        if fused is not None:
            raise ConfigError(f"{label}: layer = {rule.layer} travels in the fused allreduce of "
                              f"layers {fused[0]}..{fused[1]} ([sync] bucket_bytes = "
                              f"{cfg.sync.bucket_bytes}), which is named by its lowest layer",
                              hint=f"use layer = {fused[0]}, or set [sync] bucket_bytes = 0 "
                                   f"(one allreduce per layer)")
        if rule.kind in MESSAGE_KINDS and alg == "native":
            raise ConfigError(f"{label}: message faults act on the harness's own allreduce "
                              f"algorithms; [sync] algorithm = \"native\" is MPI's allreduce, "
                              f"which cannot be intercepted message by message",
                              hint="set [sync] algorithm = \"ring\", \"recursive_doubling\" "
                                   "or \"tree\"")
        if rule.phase is not None and alg != "native" and rule.phase not in ALGORITHM_PHASES[alg]:
            raise ConfigError(f"{label}: phase = \"{rule.phase}\" never occurs in the {alg} "
                              f"allreduce; its phases are "
                              f"{', '.join(ALGORITHM_PHASES[alg])}")


def _forget_earlier_run(out: Path, size: int) -> None:
    """A fresh start in a used folder: nothing of an earlier run may mix with this one.

    Its checkpoints must never be resumed by mistake, and its metrics, events and per-rank
    logs of ranks this run does not have must not be read as this run's.  (Rank 0 only; the
    per-rank logs of ranks < size are rewritten by their ranks.)
    """
    old = checkpoint.list_checkpoints(out)
    stale = [out / "metrics.jsonl", out / "events.jsonl"]
    for pattern in ("ledger-rank*.jsonl", "faults-rank*.jsonl"):
        stale += [p for p in out.glob(pattern)
                  if int(p.stem.rsplit("rank", 1)[1]) >= size]
    for path in old + stale:
        path.unlink(missing_ok=True)
    if old:
        print(f"mpitrain: starting afresh in {out}: removed {len(old)} checkpoint(s) of an "
              f"earlier run (use --resume to continue one)", file=sys.stderr)


def _resume_identity(ctx, cfg) -> dict:
    """What a checkpoint's run and a resuming run must share to be the same training."""
    return {"ranks": ctx.size, "batch_size": cfg.data.batch_size, "seed": cfg.run.seed,
            "shuffle": cfg.data.shuffle, "tail": cfg.data.tail, "source": cfg.data.source,
            "layers": list(cfg.model.layers), "dtype": cfg.model.dtype,
            "optimizer": cfg.optim.name}


def _restore(ctx, cfg, out: Path, model: MLP, optim: Optimizer) -> int:
    """Collective: load the newest checkpoint (read by rank 0, broadcast); return its step.

    Returns 0 when there is no checkpoint (a fresh start).  Every rank raises the same error
    if rank 0 cannot read it or it belongs to a different training (other ranks, batch,
    seed, data order, model or optimizer).
    """
    loaded = None
    if ctx.is_root:
        try:
            found = checkpoint.list_checkpoints(out)
            loaded = checkpoint.load(found[-1]) if found else None
        except MpitrainError as err:
            loaded = err
    loaded = ctx.comm.bcast(loaded, root=0)
    if isinstance(loaded, MpitrainError):
        loaded.reporter = 0
        raise loaded
    if loaded is None:
        return 0
    arrays, meta = loaded
    mine = _resume_identity(ctx, cfg)
    differ = [f"{k} {meta.get(k)!r} -> {v!r}" for k, v in mine.items() if meta.get(k) != v]
    if differ:
        raise MpitrainError(
            f"the checkpoint of step {meta['step']} in {out} belongs to a different training "
            f"({'; '.join(differ)}): resuming it would not continue the same run",
            hint="resume with the job the checkpoint was written by, or use a new [run] out",
            reporter=0)
    try:
        model.load_state({k: v for k, v in arrays.items() if k.startswith("layers.")},
                         f"checkpoint step {meta['step']}")
        optim.load_state_dict(arrays)
    except (MpitrainError, KeyError, ValueError) as exc:
        raise MpitrainError(f"the checkpoint of step {meta['step']} in {out} does not fit this "
                            f"job: {exc}", hint="use a new [run] out", reporter=0) from None
    return int(meta["step"])


def _loop(ctx, cfg, s: Setup, sync: GradientSync, metrics: Metrics, stop: "_StopSignal") -> dict:
    """All steps from ``s.start_step + 1``; then the final check and ``model.npz``."""
    spe = s.sampler.steps_per_epoch
    classify = s.dataset.classes is not None
    epoch_sums = _epoch_so_far(metrics, s.start_step, spe)  # loss, correct, samples
    order, order_epoch = None, -1
    record, last_epoch = {}, {}
    for step in range(s.start_step + 1, s.total_steps + 1):
        epoch, k = divmod(step - 1, spe)
        if epoch != order_epoch:
            order, order_epoch = s.sampler.epoch_order(epoch), epoch
        record, stop_now = _step(ctx, cfg, s, sync, metrics, step, epoch, k, order, stop)
        metrics.step(record)
        epoch_sums += (record["loss"] * record["samples"], record["correct"], record["samples"])

        # Step-end duties.  They use native collectives, so first make sure no rank is
        # failing inside the transport (it would leave the others waiting in MPI).
        last = step == s.total_steps
        epoch_end = k == spe - 1 or last
        check = cfg.sync.check_every and step % cfg.sync.check_every == 0 and not last
        if epoch_end or check or (stop_now and not last):
            sync.fence(step)
        if epoch_end:
            last_epoch = _end_of_epoch(ctx, s, metrics, step, epoch, epoch_sums, classify)
            epoch_sums[:] = 0
        if check:
            _checked(cfg, metrics, step,
                     lambda: verify_replicas(ctx.comm, [p.flat for p in s.model.params], step))
        if stop_now and not last:  # on the last step, finishing is the best checkpoint
            _save_checkpoint(ctx, cfg, s, step)
            metrics.event("preempted", step)
            raise Preempted(f"stopped by a signal at step {step}; checkpoint written to "
                            f"{checkpoint.checkpoint_dir(s.out)}",
                            hint="run the same command with --resume to continue", reporter=0)
        if last or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
            _save_checkpoint(ctx, cfg, s, step)

    _checked(cfg, metrics, s.total_steps,
             lambda: verify_replicas(ctx.comm, [p.flat for p in s.model.params], s.total_steps))
    if ctx.is_root:
        checkpoint.write_npz(s.out / "model.npz", s.model.state())
    return {"steps": s.total_steps, "out": str(s.out), "loss": record.get("loss"),
            "val_loss": last_epoch.get("val_loss"), "val_accuracy": last_epoch.get("val_accuracy")}


def _epoch_so_far(metrics: Metrics, start_step: int, spe: int) -> np.ndarray:
    """(loss x samples, correct, samples) of the epoch a resumed run re-enters mid-way, from
    the step records it kept (rank 0 writes them, and only rank 0 reports epochs)."""
    sums = np.zeros(3)
    epoch = start_step // spe
    for r in metrics.records():
        if r.get("kind") == "step" and r["epoch"] == epoch and r["step"] <= start_step:
            sums += (r["loss"] * r["samples"], r.get("correct", 0), r["samples"])
    return sums


def _step(ctx, cfg, s: Setup, sync: GradientSync, metrics: Metrics, step: int, epoch: int,
          k: int, order: np.ndarray, stop: "_StopSignal") -> tuple[dict, bool]:
    """One global step on this rank: (its metrics record, whether all ranks must stop now)."""
    model = s.model
    t_start = time.perf_counter()
    idx, n_global = s.sampler.shard(epoch, k, order)
    x, y = s.dataset.batch(idx, model.dtype, ctx.xp)

    # Forward and loss.  Each sample is weighted 1/n_global, so the gradients' SUM over
    # ranks (what the allreduce computes) is their mean over the global batch.
    out = model.forward(x)
    loss_sum, dz = model.loss(out, y, 1.0 / n_global)
    if not np.isfinite(loss_sum):
        raise NumericsError(f"rank {ctx.rank}: the loss is {loss_sum} at step {step}",
                            hint="lower [optim] lr, or check the data for NaN/Inf")
    correct = model.correct(out, y) if s.dataset.classes is not None else 0
    # The step's statistics travel in one small allreduce that overlaps the backward pass;
    # the stop flag in it makes every rank stop at the same step after a signal.
    stats = np.array([loss_sum, correct, len(idx), stop.requested], dtype=np.float64)
    stats_req = ctx.comm.Iallreduce(MPI.IN_PLACE, stats, MPI.SUM)

    # Backward, handing each layer to the synchronizer as soon as it is ready.
    sync.begin(step)
    for layer in model.backward(dz):
        sync.layer_ready(layer)
    waited = sync.finish()
    t_wait = time.perf_counter()
    wait_native(stats_req, cfg.faults.deadline_ms / 1e3, f"the statistics of step {step}",
                oversubscribed=ctx.oversubscribed)
    waited += time.perf_counter() - t_wait
    # end-to-end checks (lossy delivery, fault plans), before the update
    _checked(cfg, metrics, step, lambda: sync.verify(step))

    lr = learning_rate(cfg.optim, step, s.total_steps)
    s.optim.step([g.flat for g in model.grads], lr)
    total = time.perf_counter() - t_start
    loss, correct, samples, stop_votes = stats
    record = {"step": step, "epoch": epoch, "loss": loss,
              "accuracy": correct / samples if s.dataset.classes is not None else None,
              "correct": int(correct), "lr": lr, "samples": int(samples),
              "time_compute": total - waited - sync.comm_s, "time_comm": sync.comm_s,
              "time_wait": waited, "time_total": total,
              "samples_per_s": samples / total}
    return record, stop_votes > 0


def _checked(cfg, metrics: Metrics, step: int, check) -> None:
    """Run a collective consistency check; with on_divergence = "warn", report and go on.

    The checks raise on every rank together, so every rank takes the same branch.  NaNs
    are never waved through: they would poison every replica at the next update.
    """
    try:
        check()
    except (DivergenceError, ReductionError) as err:
        if cfg.faults.on_divergence != "warn":
            raise
        metrics.event("divergence", step, message=err.message)
        metrics.note(f"mpitrain: warning: {err.message}")


def _report_transport(ctx, stats: dict, metrics: Metrics, step: int) -> None:
    """Collective: sum the transport counters over ranks; rank 0 reports what faults cost."""
    if not stats:
        return
    keys = sorted(stats)
    totals = ctx.comm.allreduce(np.array([stats[k] for k in keys], dtype=np.float64), op=MPI.SUM)
    total = dict(zip(keys, totals.tolist()))
    metrics.event("transport", step, **total)
    if total["retransmissions"] or total["lost"] or total["corrupt_detected"]:
        metrics.note(f"transport: {int(total['sent'])} messages, "
                     f"{int(total['retransmissions'])} retransmitted "
                     f"({total['recovery_s']:.3f} s recovering), {int(total['lost'])} lost, "
                     f"{int(total['corrupt_detected'])} corrupt detected, "
                     f"{int(total['stale_discarded'])} duplicates/stale discarded")


def _end_of_epoch(ctx, s: Setup, metrics: Metrics, step: int, epoch: int,
                  sums: np.ndarray, classify: bool) -> dict:
    """Collective: validation, and the epoch's record (train figures: means over its samples)."""
    val_loss = val_acc = None
    if len(s.val_idx):
        val_loss, val_acc = evaluate(ctx, s.model, s.dataset, s.val_idx)
        val_acc = val_acc if classify else None
    n = max(sums[2], 1)
    record = {"step": step, "epoch": epoch, "loss": sums[0] / n,
              "accuracy": sums[1] / n if classify else None,
              "val_loss": val_loss, "val_accuracy": val_acc}
    metrics.epoch(record)
    return record


def evaluate(ctx, model: MLP, dataset: data.Dataset, idx: np.ndarray,
             chunk: int = 1024) -> tuple[float, float]:
    """Collective: (mean loss, accuracy) over ``idx``, each rank taking a contiguous part."""
    part = np.array_split(idx, ctx.size)[ctx.rank]
    totals = np.zeros(3)
    for start in range(0, len(part), chunk):
        x, y = dataset.batch(part[start:start + chunk], model.dtype, ctx.xp)
        out = model.forward(x)
        loss_sum, _ = model.loss(out, y, 1.0)
        totals += (loss_sum, model.correct(out, y), len(x))
    ctx.comm.Allreduce(MPI.IN_PLACE, totals, MPI.SUM)
    return totals[0] / totals[2], totals[1] / totals[2]


def _save_checkpoint(ctx, cfg, s: Setup, step: int) -> None:
    if ctx.is_root:
        meta = {**_resume_identity(ctx, cfg), "job": cfg.name}
        checkpoint.save(s.out, step, {**s.model.state(), **s.optim.state_dict()}, meta,
                        cfg.run.keep_checkpoints)


class _StopSignal:
    """Turns SIGTERM/SIGUSR1 (preemption, Slurm's --signal) into a flag read at step ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = 0
        self._old = {}
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: the step boundary is not coming, stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = 1

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
