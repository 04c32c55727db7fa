"""Idle cost of the fault-injection hooks.

    mpiexec -n 4 python benchmarks/fault_hooks.py [--repeats 30] [--algorithm ring]

A "step" is one allreduce per layer of a small MLP's gradients (784x128+128,
128x64+64, 64x10+10; float32), last layer first, through the transport.  Three
variants are interleaved (so drift in machine load hits all of them alike):
``injector=None`` (no plan: the default), an injector with an *empty* plan, and
an injector with a plan whose only rule never matches (a step no run reaches, so every
message walks the rule filters).  Reports the median step time of each and the
overhead against ``None``.  Target: the hooks' idle cost under 3% of a step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpitrain.comm.allreduce import make_allreducer  # noqa: E402
from mpitrain.comm.faults import FaultInjector, FaultPlan  # noqa: E402
from mpitrain.comm.transport import Transport  # noqa: E402

LAYERS = [784 * 128 + 128, 128 * 64 + 64, 64 * 10 + 10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--algorithm", default="ring")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    rank = comm.Get_rank()
    variants = {
        "injector=None": None,
        "empty plan": FaultInjector(FaultPlan([], 0), rank),
        "non-matching rule": FaultInjector(FaultPlan([{"kind": "drop", "step": 10**9}], 0), rank),
    }
    ars = {name: make_allreducer(args.algorithm, comm, Transport(comm, injector=inj))
           for name, inj in variants.items()}
    grads = [np.random.default_rng(rank).standard_normal(n).astype(np.float32) for n in LAYERS]
    times: dict[str, list[float]] = {name: [] for name in ars}
    for rep in range(args.repeats + 3):
        for name, ar in ars.items():  # interleaved
            bufs = [g.copy() for g in grads]
            comm.Barrier()
            t0 = time.perf_counter()
            for layer in reversed(range(len(bufs))):
                ar.wait(ar.start(bufs[layer], rep + 1, layer))
            dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if rep >= 3:  # warm-up
                times[name].append(dt)
    if rank == 0:
        base = statistics.median(times["injector=None"])
        print(f"{args.algorithm} allreduce, {comm.Get_size()} ranks, layers {LAYERS} float32, "
              f"{args.repeats} interleaved repeats (median step time):")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:18s} {1e3 * med:8.3f} ms  {100 * (med / base - 1):+6.2f}%")


if __name__ == "__main__":
    main()
