"""``mpitrain evaluate TARGET [--data JOB_OR_NPZ] [--set ...] [--split ...] [--json]
[-n P [--hosts H | --hostfile F] [-- MPIEXEC_ARGS]]``: a trained model on a data set, at
any rank count.

TARGET is a run folder or a parameter file:

* a run folder: its ``model.npz`` (else its newest checkpoint) on the model and data of its
  ``config.toml``; ``--data`` swaps in another data set (an .npz / a folder of x.npy and
  y.npy, or a job whose ``[data]`` section and seed are used);
* a parameter ``.npz`` (a checkpoint file too: its optimizer state is ignored): the model
  and data are those of the job ``--data`` names (or of an .npz given as ``--data``, with
  the built-in job's model), else of the built-in digits job; ``--set`` applies on top.

The split: ``--split val|train|all``, the split of ``[data] val_fraction`` and the seed that
training used.  By default a run folder evaluated on its own data uses its validation split
(held out from training: the figures equal the run's last ``val_loss`` / ``val_accuracy``);
anything else uses all samples.

Runs like ``mpitrain run``: under mpiexec/srun (each rank evaluates a contiguous part of the
samples and the sums are added up, :func:`mpitrain.train.evaluate`), in one process, or
re-launched with ``-n P`` (on other hosts too, as ``run -n P --hosts``).  Rank 0 prints mean
loss, accuracy and, for classification, the confusion matrix (rows: true class, columns:
predicted), or with ``--json`` one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint, config, data, jobs
from ..config import JobConfig
from ..context import RankContext, World, environment
from ..errors import ConfigError, DataError
from ..launch import exec_under_mpiexec, launch_options
from ..metrics import fmt
from ..model import MLP
from ..session import session
from .progress import print_result

SPLITS = ("val", "train", "all")
SPLIT_NAMES = {"val": "validation split", "train": "training split", "all": "all samples"}
CORNER = "true\\pred"  # the confusion matrix's top-left: rows true, columns predicted


@dataclass(frozen=True)
class Plan:
    """What to evaluate: parameters, the job that gives model and data, the split."""

    params: Path
    cfg: JobConfig
    split: str
    data_where: str  # names the data's source in data error messages


def main(args: argparse.Namespace) -> int:
    """``mpitrain evaluate``: every rank calls it; 0 after printing.  With ``args.nprocs``
    it does not return (the process becomes ``mpiexec -n P`` running it without ``-n``)."""
    options = launch_options(args.nprocs, args.hosts, args.hostfile, args.launcher_args,
                             "evaluate")
    if args.nprocs is not None:
        make_plan(args, environment())  # bad input: one message before any rank starts
        exec_under_mpiexec(args.nprocs, ["-m", "mpitrain", *command_line(args)],
                           options=options)
    with session() as world:
        with world.collective_errors():
            plan = make_plan(args, world.env)
        result = evaluate_on_ranks(world, plan)
        if world.rank == 0:
            print_result(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


def command_line(args: argparse.Namespace) -> list[str]:
    """The ``evaluate`` arguments of ``args`` without ``-n`` (for the re-launch)."""
    line = ["evaluate", args.target]
    if args.data is not None:
        line += ["--data", args.data]
    for item in args.overrides:
        line += ["--set", item]
    if args.split is not None:
        line += ["--split", args.split]
    return line + ["--json"] * args.json


# --------------------------------------------------------------------------- what to evaluate
def make_plan(args: argparse.Namespace, environ: dict[str, str]) -> Plan:
    """Local, no MPI, reads no data: the parameter file, the job and the split.  Bad input
    raises :class:`ConfigError`."""
    target = Path(args.target)
    if target.is_dir():
        run_config = target / "config.toml"
        if not run_config.is_file():
            raise ConfigError(f"{target}: not a run folder (it has no config.toml)",
                              hint="give the output folder of a run, or a parameter .npz")
        params, base = run_parameters(target), run_config
    elif target.is_file():
        params, base = target, None
    else:
        raise ConfigError(f"{target}: no such run folder or parameter file",
                          hint="give the output folder of a run (e.g. runs/digits) or a "
                               "parameter .npz (e.g. runs/digits/model.npz)")
    cfg, data_where = _job(base, args.data, list(args.overrides), environ)
    own_data = base is not None and args.data is None
    split = args.split or ("val" if own_data and cfg.data.val_fraction > 0 else "all")
    return Plan(params, cfg, split, data_where)


def run_parameters(run_dir: Path) -> Path:
    """A run's final ``model.npz``, else its newest checkpoint."""
    if (run_dir / "model.npz").is_file():
        return run_dir / "model.npz"
    saved = checkpoint.list_checkpoints(run_dir)
    if not saved:
        raise ConfigError(f"{run_dir}: the run has no model.npz and no checkpoint yet",
                          hint="wait for the run to write one (checkpoint_every), or "
                               "resume it: mpitrain run JOB --resume")
    return saved[-1]


def _job(base: Path | None, data_arg: str | None, overrides: list[str],
         environ: dict[str, str]) -> tuple[JobConfig, str]:
    """(the job giving model and data, what names the data source): ``base`` (a run's
    config.toml, or None: the built-in job) with ``data_arg`` as a data file or job."""
    if data_arg is None:
        return config.load(base, overrides, environ), str(base or "built-in job")
    if Path(data_arg).suffix == ".npz" or Path(data_arg).is_dir():
        file_sets = ['data.source="file"', f"data.path={json.dumps(data_arg)}"]
        return config.load(base, overrides + file_sets, environ), f"--data {data_arg}"
    data_job = jobs.resolve(data_arg)
    data_cfg = config.load(data_job, overrides, environ)
    if base is None:  # a parameter file: the --data job is the whole job
        return data_cfg, str(data_job)
    run_cfg = config.load(base, overrides, environ)
    # The data set, its split and synthetic data follow [data] and the seed of the data job.
    return dataclasses.replace(run_cfg, data=data_cfg.data,
                               run=dataclasses.replace(run_cfg.run, seed=data_cfg.run.seed)
                               ), str(data_job)


# --------------------------------------------------------------------------- on the ranks
def evaluate_on_ranks(world: World, plan: Plan) -> dict[str, Any]:
    """Collective: load the model and data on every rank, evaluate, return the result."""
    from .. import train  # imports MPI: not at import time (the -n launcher starts none)
    with world.collective_errors():
        ctx = RankContext.create(world, plan.cfg, world.env)
        model, dataset, idx = _load(ctx, plan)
    ctx.connect(world)
    try:
        classes = dataset.classes
        confusion = np.zeros((classes, classes), np.int64) if classes else None
        with np.errstate(all="ignore"):  # a NaN loss is printed, not warned about per rank
            loss, accuracy = train.evaluate(ctx, model, dataset, idx, confusion=confusion)
    finally:
        ctx.close()
    return {"parameters": str(plan.params), "data": dataset.name, "split": plan.split,
            "samples": len(idx), "ranks": world.size, "loss": float(loss),
            "accuracy": float(accuracy) if classes else None,
            "correct": int(confusion.trace()) if confusion is not None else None,
            "classes": classes,
            "confusion": confusion.tolist() if confusion is not None else None}


def _load(ctx: RankContext, plan: Plan) -> tuple[MLP, data.Dataset, np.ndarray]:
    """This rank's model (the parameters loaded), the data set and the samples to evaluate
    (local: call inside ``World.collective_errors``)."""
    cfg = plan.cfg
    try:
        dataset = data.load(cfg.data, cfg.run.seed, ctx.rank, ctx.size)
        train_idx, val_idx = data.split(len(dataset.x), cfg.data.val_fraction, cfg.run.seed)
        data.check_values(dataset, val_idx, ctx.rank, ctx.size)
        idx = {"val": val_idx, "train": train_idx, "all": np.arange(len(dataset.x))}[plan.split]
        if not len(idx):
            raise DataError(f"--split {plan.split}: the {SPLIT_NAMES[plan.split]} is empty "
                            f"([data] val_fraction = {cfg.data.val_fraction})",
                            hint="use --split all, or set data.val_fraction")
        out_width = cfg.model.layers[-1]
        if dataset.y.ndim == 1 and dataset.classes is not None and dataset.classes < out_width:
            # test labels need not use every class the model knows
            dataset = dataclasses.replace(dataset, classes=out_width)
        data.check_fits(dataset, len(idx), out_width, cfg.model.loss, 1, 1, "weighted")
        fan_in = input_width(plan.params)
        if fan_in is not None and fan_in != dataset.features:
            raise DataError(f"the data ({dataset.name}) has {dataset.features} features but the "
                            f"model of {plan.params} takes {fan_in} inputs",
                            hint="evaluate on data like the model's training data (--data)")
    except DataError as err:  # name the data's source, like `mpitrain run` names the job
        err.message = f"{plan.data_where}: {err.message}"
        raise
    return load_model(cfg, dataset.features, plan.params, ctx.xp), dataset, idx


def input_width(params: Path) -> int | None:
    """The input width (fan-in of layer 0) of a parameter file or checkpoint; None when
    the file cannot tell (:func:`load_model` then says what is wrong with it)."""
    try:
        with np.load(params) as z:
            return int(z["layers.0.weight"].shape[0])
    except (OSError, ValueError, KeyError, EOFError, IndexError, AttributeError,
            zipfile.BadZipFile):
        return None


def load_model(cfg: JobConfig, features: int, params: Path, xp: Any) -> MLP:
    """The ``[model]`` of ``cfg`` with the parameters of ``params``: a parameter file, or a
    checkpoint (whose optimizer state is left out)."""
    m = cfg.model
    model = MLP(features, m.layers, m.activation, m.output, m.loss, m.dtype, xp)
    if checkpoint.CHECKPOINT_RE.match(params.name):
        arrays, _ = checkpoint.load(params)
        model.load_state({k: v for k, v in arrays.items() if k.startswith("layers.")},
                         f"checkpoint {params}")
    else:
        model.load_file(params)
    return model


# --------------------------------------------------------------------------- output
def format_result(r: dict[str, Any]) -> str:
    """The result for people: a title line, loss, accuracy and the confusion matrix."""
    lines = [f"# mpitrain evaluate: {r['parameters']} on {r['data']}, {SPLIT_NAMES[r['split']]}"
             f" ({r['samples']} samples), {r['ranks']} rank{'s' * (r['ranks'] > 1)}",
             f"loss      {fmt(r['loss'])}"]
    if r["accuracy"] is not None:
        lines.append(f"accuracy  {fmt(r['accuracy'])}  ({r['correct']} of {r['samples']} "
                     f"correct)")
    if r["confusion"] is not None:
        lines.append("confusion matrix: rows = true class, columns = predicted class")
        counts = np.asarray(r["confusion"])
        width = max(len(str(counts.max())), len(str(len(counts) - 1)), 3)
        lines.append(f"{CORNER:>9} " + " ".join(f"{c:>{width}}" for c in range(len(counts))))
        lines += [f"{t:>9} " + " ".join(f"{n:>{width}}" for n in row)
                  for t, row in enumerate(counts)]
    return "\n".join(lines)
