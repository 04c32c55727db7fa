"""mpitrain through its API, timed the same way as the other loops.

Runs ``benchmarks/mlp.toml`` (native allreduce, overlap on, metrics on, no fault plan) with
``train.setup``/``train.run``, exactly as ``mpitrain run`` does, and records the time at which
each step's metrics record is written (rank 0): the step period includes everything the
harness does per step (metrics, checks), not only what it times itself.

    mpiexec -n 2 python benchmarks/mpitrain_loop.py --batch 64 --steps 30 [--set k=v ...]
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
from mpitrain import train  # noqa: E402
from mpitrain.metrics import Metrics  # noqa: E402


def main() -> int:
    args = common.args_from_argv()
    stamps = []
    original = Metrics.step

    def stamped(self, record):
        original(self, record)
        stamps.append(common.now())

    Metrics.step = stamped
    with common.mlp_job(args, args.warmup + args.steps + 1, "mpitrain-cmp-") as (
            world, ctx, cfg, prepared, out):
        stamps.append(common.now())
        train.run(ctx, cfg, prepared)
        ctx.close()
    if world.rank == 0:
        from mpitrain.metrics import read_jsonl
        recs = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("kind") == "step"]
        recs = recs[args.warmup + 1:]
        med = lambda k: sorted(r[k] for r in recs)[len(recs) // 2]  # noqa: E731
        common.report("mpitrain", world.rank, world.size, args.batch, stamps, args.warmup + 1,
                      metrics_time_total_s=med("time_total"), metrics_time_wait_s=med("time_wait"),
                      metrics_time_compute_s=med("time_compute"),
                      metrics_time_comm_s=med("time_comm"))
        import shutil
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
