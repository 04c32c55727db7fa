"""A minimal hand-written data-parallel loop: NumPy forward/backward, one MPI Allreduce per
layer, SGD.  Nothing else (no checks, no metrics file, no fault hooks): the floor the harness
is measured against.

    mpiexec -n 2 python benchmarks/minimal_loop.py --batch 64 --steps 30
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import common  # noqa: E402


def main() -> int:
    args = common.args_from_argv()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x_all, y_all = common.synthetic()
    x_all = x_all.astype(np.float32)
    ws, bs = common.he_init()
    # one flat gradient buffer per layer (weight and bias views): one Allreduce per layer
    flats = [np.empty(w.size + w.shape[1], np.float32) for w in ws]
    gws = [f[:w.size].reshape(w.shape) for f, w in zip(flats, ws)]
    gbs = [f[w.size:] for f, w in zip(flats, ws)]
    b, gb = args.batch, args.batch * size
    per_epoch = len(x_all) // gb
    rng = np.random.default_rng(common.SEED)
    order = None
    stamps = [common.now()]
    for step in range(args.warmup + args.steps + 1):
        k = step % per_epoch
        if k == 0:
            order = rng.permutation(len(x_all))
        idx = order[k * gb + rank * b: k * gb + (rank + 1) * b]
        x, y = x_all[idx], y_all[idx]
        # forward
        acts = [x]
        a = x
        for i, (w, bias) in enumerate(zip(ws, bs)):
            z = a @ w + bias
            a = np.maximum(z, 0) if i < len(ws) - 1 else z
            acts.append(a)
        z = a - a.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        # backward: d(mean CE over the global batch)/dz = (p - onehot) / global batch
        p[np.arange(b), y] -= 1
        dz = p / gb
        for i in range(len(ws) - 1, -1, -1):
            np.matmul(acts[i].T, dz, out=gws[i])
            np.sum(dz, axis=0, out=gbs[i])
            if i:
                dz = (dz @ ws[i].T) * (acts[i] > 0)
        for f in reversed(flats):
            comm.Allreduce(MPI.IN_PLACE, f, MPI.SUM)
        for w, bias, gw, gbias in zip(ws, bs, gws, gbs):
            w -= common.LR * gw
            bias -= common.LR * gbias
        stamps.append(common.now())
    common.report("minimal", rank, size, b, stamps, args.warmup + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
