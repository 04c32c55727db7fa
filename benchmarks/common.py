"""Shared settings of the comparison benchmarks (no mpitrain, torch or MPI imports here).

The model: MLP 784-1024-1024-10, ReLU, softmax cross-entropy, plain SGD, float32.
The data: the same synthetic classification set ``mpitrain`` builds for ``[data] source =
"synthetic"`` (Gaussian class blobs from the seed), regenerated here with the same recipe so
every implementation trains on the same samples.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

import numpy as np

FEATURES, HIDDEN, CLASSES = 784, (1024, 1024), 10
SIZES = (FEATURES, *HIDDEN, CLASSES)
SAMPLES = 8192
NOISE = 0.5
SEED = 0
LR = 0.01


def synthetic(samples: int = SAMPLES, seed: int = SEED):
    """x (float64, like mpitrain's synthetic source) and integer labels y."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    centres = rng.normal(size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, size=samples)
    x = centres[y] + NOISE * rng.normal(size=(samples, FEATURES))
    return x, y


def he_init(seed: int = SEED):
    """He-normal weights (fan_in, fan_out) and zero biases, float32, the same on every rank."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A17]))
    ws, bs = [], []
    for fi, fo in zip(SIZES[:-1], SIZES[1:]):
        ws.append(rng.normal(0.0, np.sqrt(2.0 / fi), (fi, fo)).astype(np.float32))
        bs.append(np.zeros(fo, np.float32))
    return ws, bs


def rank_and_size() -> tuple[int, int]:
    """From the launcher's environment (MPICH hydra: PMI_RANK/PMI_SIZE), without MPI."""
    for r, s in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if r in os.environ:
            return int(os.environ[r]), int(os.environ[s])
    return 0, 1


def report(impl: str, rank: int, size: int, batch: int, stamps: list[float], warmup: int,
           **extra) -> None:
    """Rank 0 prints one JSON line: per-step periods (end of step to end of next step)."""
    if rank != 0:
        return
    periods = [b - a for a, b in zip(stamps[:-1], stamps[1:])][warmup:]
    print(json.dumps({"impl": impl, "ranks": size, "batch": batch, "step_times": periods,
                      "median_s": float(np.median(periods)), **extra}), flush=True)


def now() -> float:
    return time.perf_counter()


def args_from_argv():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--steps", type=int, default=30, help="measured steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of benchmarks/mlp.toml (mpitrain runs only)")
    return p.parse_args(sys.argv[1:])


@contextmanager
def mlp_job(args, steps: int, prefix: str):
    """benchmarks/mlp.toml set up exactly as `mpitrain run` does it, in a temporary folder.

    A context manager, entered on every rank: yields (world, ctx, cfg, prepared, out) inside
    mpitrain's session (errors and exit as in `mpitrain run`); the caller runs
    ``train.run(ctx, cfg, prepared)`` and closes ``ctx`` in the block.
    """
    import tempfile
    from mpitrain import config, context, train
    from mpitrain.session import session
    with session() as world:
        out = world.comm.bcast(tempfile.mkdtemp(prefix=prefix) if world.rank == 0 else None)
        with world.collective_errors():
            cfg = config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlp.toml"),
                              [f"data.batch_size={args.batch}", f"run.steps={steps}",
                               f"run.out={json.dumps(out)}", *args.sets], world.env)
            ctx = context.RankContext.create(world, cfg, world.env)
            prepared = train.setup(ctx, cfg)
        ctx.connect(world)
        yield world, ctx, cfg, prepared, out
