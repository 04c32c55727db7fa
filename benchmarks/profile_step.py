"""cProfile of mpitrain's training loop, one profile per rank.

    mpiexec -n 2 python benchmarks/profile_step.py --batch 64 --steps 60 [--set k=v ...]

Writes benchmarks/results/profile-b{batch}-p{P}-rank{r}.txt (top functions by own time) and
prints rank 0's.  Operators (a @ W) are C calls cProfile does not list: their time shows as
the own time of the Python function that uses them (MLP.forward, MLP.backward, ...).
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
from mpitrain import train  # noqa: E402


def main() -> int:
    args = common.args_from_argv()
    prof = cProfile.Profile()
    with common.mlp_job(args, args.steps, "mpitrain-prof-") as (world, ctx, cfg, prepared, out):
        prof.enable()
        train.run(ctx, cfg, prepared)
        prof.disable()
        ctx.close()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"profile-b{args.batch}-p{world.size}-rank{world.rank}.txt")
    with open(path, "w") as fh:
        fh.write(s.getvalue())
    if world.rank == 0:
        print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
