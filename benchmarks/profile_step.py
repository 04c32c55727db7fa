"""cProfile of mpitrain's training loop, one profile per rank.

    mpiexec -n 2 python benchmarks/profile_step.py --batch 64 --steps 60 [--set k=v ...]

Writes benchmarks/results/profile-b{batch}-p{P}-rank{r}.txt (top functions by own time) and
prints rank 0's.  Operators (a @ W) are C calls cProfile does not list: their time shows as
the own time of the Python function that uses them (MLP.forward, MLP.backward, ...).
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sets, argv = [], []
it = iter(sys.argv[1:])
for a in it:
    (sets.append(next(it)) if a == "--set" else argv.append(a))
sys.argv[1:] = argv

import common  # noqa: E402
from mpitrain import config, context, train  # noqa: E402


def main() -> int:
    args = common.args_from_argv()
    env = context.environment()
    world = context.World(env)
    out = world.comm.bcast(tempfile.mkdtemp(prefix="mpitrain-prof-") if world.rank == 0 else None)
    cfg = config.load(os.path.join(HERE, "mlp.toml"),
                      [f"data.batch_size={args.batch}", f"run.steps={args.steps}",
                       f"run.out={json.dumps(out)}", *sets], env)
    ctx = context.RankContext.create(world, cfg, env)
    prepared = train.setup(ctx, cfg)
    ctx.connect(world)
    prof = cProfile.Profile()
    prof.enable()
    train.run(ctx, cfg, prepared)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"profile-b{args.batch}-p{world.size}-rank{world.rank}.txt")
    with open(path, "w") as fh:
        fh.write(s.getvalue())
    if world.rank == 0:
        print(s.getvalue())
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
