"""Elastic resume: a run continues the same mathematics on another rank count.

What a run samples depends on its global batch, never on its rank count: the epoch's order
is a function of (seed, epoch) and each step takes the next ``global_batch`` samples of it,
split into as many blocks as there are ranks (shard.ShardSampler); every sample is weighted
1/(samples in the global batch), so the gradients' sum over the ranks is the same mean
however the batch was split.  A fresh run's global batch is ``batch_size x ranks``; a
resumed run keeps its checkpoint's (checkpoint.kept_global_batch), so a run that lost a
rank and resumes on fewer -- or is resumed by hand on more -- trains on exactly the samples,
with exactly the weights, the uninterrupted run would have: its parameters differ only by
the rounding of another summation order.

:func:`sampling` and :func:`check_plan` are the parts of a run's set-up that depend on the
global batch and the rank count; train.setup calls them for a fresh start, and
:func:`continue_from` again once the checkpoint has told the global batch and its rank
count.  A fault plan may name ranks the resumed run lacks (a ``crash`` of rank 1, resumed
on one rank after --min-ranks dropped the crashed one): those rules are kept but inert --
a line and a "fault_rules_inert" event say so -- while a fresh start still refuses them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import checkpoint, data, shard, trace
from .config import JobConfig
from .context import RankContext
from .errors import DataError, MpitrainError
from .metrics import Metrics
from .model import MLP
from .schema import FaultRule, PlanScope, inert_rules, validate_plan


def sampling(ctx: RankContext, cfg: JobConfig, dataset: data.Dataset, train_idx: np.ndarray,
             global_batch: int | None) -> tuple[shard.ShardSampler, int]:
    """This rank's sampler and the run's total steps, for ``global_batch`` samples a step
    (None: ``batch_size`` per rank, a fresh start's), once the data is known to fit."""
    try:
        data.check_fits(dataset, len(train_idx), cfg.model.layers[-1], cfg.model.loss,
                        cfg.data.batch_size, ctx.size, cfg.data.tail, global_batch)
    except DataError as err:  # name the job file, like config errors do
        err.message = f"{cfg.path or 'built-in job'}: {err.message}"
        raise
    sampler = shard.ShardSampler(train_idx, cfg.data.batch_size, ctx.rank, ctx.size, cfg.run.seed,
                                cfg.data.shuffle, cfg.data.tail, global_batch)
    return sampler, cfg.run.steps or (cfg.epochs or 1) * sampler.steps_per_epoch


def check_plan(ctx: RankContext, cfg: JobConfig, model: MLP, total: int,
               resuming: bool = False, resumed_from: int = 0) -> None:
    """The fault plan and the trace window must fit this run's ranks, layers and steps.

    ``resuming``: the run may continue a checkpoint not read yet, whose run had other ranks,
    so rank filters are checked later, by :func:`continue_from`.  ``resumed_from``: the
    checkpoint's rank count, whose ranks a rule may name though this run lacks them (those
    rules are inert; :func:`report_resume` says so).
    """
    scope = PlanScope(size=ctx.size, n_layers=model.n_layers, total_steps=total,
                      algorithm=cfg.sync.algorithm, buckets=model.buckets(cfg.sync.bucket_bytes),
                      bucket_bytes=cfg.sync.bucket_bytes, resumed_from=resumed_from,
                      check_ranks=not resuming)
    validate_plan(cfg.faults.rules, scope,
                  cfg.rule_sources or [cfg.path or "built-in job"] * len(cfg.faults.rules))
    trace.check_window(cfg, total, cfg.path or "built-in job")


def continue_from(ctx: RankContext, cfg: JobConfig, dataset: data.Dataset, model: MLP,
                  sampler: shard.ShardSampler, total: int, resumed: checkpoint.Resumed
                  ) -> tuple[shard.ShardSampler, int]:
    """Collective, once every rank has read ``resumed`` (train.run, after --resume restored
    the checkpoint; step 0: there was none, a fresh start): the sampler and total steps of
    the run continuing it -- with the checkpoint's global batch, whatever this run's size --
    and the fault plan checked against them and the checkpoint's rank count.  An error is
    raised on every rank, rank 0 speaking."""
    try:
        if resumed.global_batch != sampler.global_batch:
            sampler, total = sampling(ctx, cfg, dataset, sampler.indices, resumed.global_batch)
        check_plan(ctx, cfg, model, total, resumed_from=resumed.ranks)
    except MpitrainError as err:
        err.reporter = 0
        raise
    return sampler, total


def report_resume(size: int, sampler: shard.ShardSampler, metrics: Metrics,
                  resumed: checkpoint.Resumed, rules: Sequence[FaultRule] = ()) -> None:
    """Rank 0: a line and an event for the resume, its allowed changes, a rank count other
    than the checkpoint's ("resized": the same global batch, split anew), and the fault
    ``rules`` that named ranks this run lacks ("fault_rules_inert": kept in the plan, so
    the rule numbers in the fault logs stay the same, but they can no longer apply)."""
    metrics.note(f"resumed from the checkpoint of step {resumed.step}")
    metrics.event("resume", resumed.step,
                  changed={k: list(v) for k, v in resumed.changed.items()})
    for key, (old, new) in resumed.changed.items():
        metrics.note(f"mpitrain: resumed with {key} changed: {old!r} -> {new!r}")
    if resumed.ranks != size:
        blocks = sorted({hi - lo for lo, hi in map(sampler.bounds, range(size))})
        metrics.note(f"mpitrain: resumed on {size} ranks (the checkpoint's run had "
                     f"{resumed.ranks}): its global batch of {sampler.global_batch} samples is "
                     f"split into {' or '.join(map(str, blocks))} per rank")
        metrics.event("resized", resumed.step, **{"from": resumed.ranks, "to": size},
                      global_batch=sampler.global_batch)
        inert = inert_rules(rules, size)
        if inert:
            which = ", ".join(f"rule {i} ({rules[i].kind})" for i in inert)
            metrics.note(f"mpitrain: the fault plan's {which}: no such rank in this run of "
                         f"{size}, inert from here on")
            metrics.event("fault_rules_inert", resumed.step, rules=inert, ranks=size)
