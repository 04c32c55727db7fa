"""float32 compute: the harness's forward/backward against the single-thread sgemm rate.

1. The machine's single-thread sgemm rate for each GEMM of the big layers (784x1024 and
   1024x1024) at the benchmark's per-rank batch, plain contiguous operands (numpy @).
2. The same GEMMs in the call forms the harness uses (model.py: ``a @ W`` on views of the
   flat parameter buffer, ``matmul(a_prev.T, dz, out=grad view)``, ``dz @ W.T``).
3. The harness's own time: ``MLP.forward`` + ``loss`` + ``backward`` (mpitrain.model), and the
   GEMM flops of the big layers divided by it.  That time includes the element-wise work
   (bias, ReLU, softmax, masks) too, so the rate it gives is a lower bound on the rate inside
   the matmuls; the rest of the time is listed as "non-GEMM".

All interleaved, repeated, medians.  One BLAS thread (threadpoolctl), like a harness rank.

    python benchmarks/gemm_rate.py --batch 64 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits


def timeit(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json")
    args = p.parse_args()
    threadpool_limits(limits=1, user_api="blas")
    from mpitrain.model import MLP
    b = args.batch
    rng = np.random.default_rng(0)
    f32 = np.float32
    m = MLP(784, [1024, 1024, 10], "relu", "softmax", "cross_entropy", "float32")
    m.init("he", 0)
    x = rng.random((b, 784), dtype=f32)
    y = np.eye(10, dtype=f32)[rng.integers(0, 10, b)]
    shapes = {"L0": (784, 1024), "L1": (1024, 1024)}   # the big layers
    # flops of the big layers' GEMMs: forward a@W, backward dW (both layers), dX (L1 only:
    # the harness computes no input gradient for layer 0)
    big_flops = sum(2 * b * i * o * (3 if k == "L1" else 2) for k, (i, o) in shapes.items())
    ops = {}
    for k, (i, o) in shapes.items():
        a, W, dz = rng.random((b, i), dtype=f32), rng.random((i, o), dtype=f32), rng.random((b, o), dtype=f32)
        aT = np.ascontiguousarray(a.T)
        WT = np.ascontiguousarray(W.T)
        flat = np.zeros(i * o + o, f32)
        Wv, G = flat[:i * o].reshape(i, o), np.zeros(i * o + o, f32)[:i * o].reshape(i, o)
        Wv[...] = W
        ops[f"{k} fwd a@W"] = (2 * b * i * o, lambda a=a, W=W: a @ W, lambda a=a, Wv=Wv: a @ Wv)
        ops[f"{k} dW a.T@dz"] = (2 * b * i * o, lambda aT=aT, dz=dz: aT @ dz,
                                 lambda a=a, dz=dz, G=G: np.matmul(a.T, dz, out=G))
        if k == "L1":
            ops[f"{k} dX dz@W.T"] = (2 * b * i * o, lambda dz=dz, WT=WT: dz @ WT,
                                     lambda dz=dz, Wv=Wv: dz @ Wv.T)

    def harness_step():
        out = m.forward(x)
        _, dz = m.loss(out, y, 1.0 / b)
        for _ in m.backward(dz):
            pass

    rec = {k: ([], []) for k in ops}
    step_t = []
    for _ in range(args.rounds):
        for k, (_, ref, harness_form) in ops.items():
            rec[k][0].append(timeit(ref, args.reps))
            rec[k][1].append(timeit(harness_form, args.reps))
        step_t.append(timeit(harness_step, args.reps))
    res = {"batch": b, "ops": {}, "big_layer_gflop": big_flops / 1e9}
    print(f"batch {b}, 1 BLAS thread, medians of {args.rounds} interleaved rounds x {args.reps} reps")
    print(f"{'GEMM':>16} {'plain(us)':>10} {'GFLOP/s':>8} {'harness form(us)':>16} {'GFLOP/s':>8}")
    ref_total = form_total = 0.0
    for k, (fl, _, _) in ops.items():
        r, h = statistics.median(rec[k][0]), statistics.median(rec[k][1])
        ref_total += r
        form_total += h
        res["ops"][k] = {"flops": fl, "plain_s": r, "harness_form_s": h}
        print(f"{k:>16} {r * 1e6:>10.1f} {fl / r / 1e9:>8.1f} {h * 1e6:>16.1f} {fl / h / 1e9:>8.1f}")
    step = statistics.median(step_t)
    res.update(sgemm_rate_gflops=big_flops / ref_total / 1e9,
               harness_form_rate_gflops=big_flops / form_total / 1e9,
               harness_step_s=step, harness_rate_lower_bound_gflops=big_flops / step / 1e9,
               non_gemm_s=step - form_total)
    print(f"single-thread sgemm rate on the big layers: {res['sgemm_rate_gflops']:.1f} GFLOP/s "
          f"({ref_total * 1e3:.3f} ms for their {big_flops / 1e9:.3f} GFLOP)")
    print(f"same GEMMs in the harness's call forms:     {res['harness_form_rate_gflops']:.1f} GFLOP/s "
          f"(= {ref_total / form_total * 100:.1f}% of the plain rate)")
    print(f"harness forward+loss+backward:              {step * 1e3:.3f} ms -> "
          f"{res['harness_rate_lower_bound_gflops']:.1f} GFLOP/s on the big-layer GEMMs "
          f"(lower bound) = {ref_total / step * 100:.1f}% of the sgemm rate; non-GEMM time "
          f"{(step - form_total) * 1e3:.3f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
