"""mpitrain through its API, timed the same way as the other loops.

Runs ``benchmarks/mlp.toml`` (native allreduce, overlap on, metrics on, no fault plan) with
``train.setup``/``train.run``, exactly as ``mpitrain run`` does, and records the time at which
each step's metrics record is written (rank 0): the step period includes everything the
harness does per step (metrics, checks), not only what it times itself.

    mpiexec -n 2 python benchmarks/mpitrain_loop.py --batch 64 --steps 30 [--set k=v ...]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sets = []
argv = []
it = iter(sys.argv[1:])
for a in it:
    if a == "--set":
        sets.append(next(it))
    else:
        argv.append(a)
sys.argv[1:] = argv

import common  # noqa: E402
from mpitrain import config, context, train  # noqa: E402
from mpitrain.metrics import Metrics  # noqa: E402


def main() -> int:
    args = common.args_from_argv()
    env = context.environment()
    world = context.World(env)
    out = world.comm.bcast(tempfile.mkdtemp(prefix="mpitrain-cmp-") if world.rank == 0 else None)
    cfg = config.load(os.path.join(HERE, "mlp.toml"),
                      [f"data.batch_size={args.batch}", f"run.steps={args.warmup + args.steps + 1}",
                       f"run.out={json.dumps(out)}", *sets], env)
    ctx = context.RankContext.create(world, cfg, env)
    prepared = train.setup(ctx, cfg)
    ctx.connect(world)
    stamps = [common.now()]
    original = Metrics.step

    def stamped(self, record):
        original(self, record)
        stamps.append(common.now())

    Metrics.step = stamped
    train.run(ctx, cfg, prepared)
    ctx.close()
    if world.rank == 0:
        from mpitrain.metrics import read_jsonl
        recs = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("kind") == "step"]
        recs = recs[args.warmup + 1:]
        med = lambda k: sorted(r[k] for r in recs)[len(recs) // 2]  # noqa: E731
        common.report("mpitrain", world.rank, world.size, args.batch, stamps, args.warmup + 1,
                      metrics_time_total_s=med("time_total"), metrics_time_wait_s=med("time_wait"),
                      metrics_time_compute_s=med("time_compute"))
        import shutil
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
