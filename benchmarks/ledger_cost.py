"""What the collective ledger costs per step, in isolation (no MPI, no training).

The 784-1024-1024-10 model's three layers, one ledger enter/leave (with the result
fingerprint) per layer per step, as the allreducers do it.

    python benchmarks/ledger_cost.py [--steps 2000]
"""
import argparse
import statistics
import tempfile
import time

import numpy as np

from mpitrain.comm.allreduce import fingerprint
from mpitrain.comm.ledger import Ledger

SIZES = (784 * 1024 + 1024, 1024 * 1024 + 1024, 1024 * 10 + 10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    bufs = [np.random.default_rng(0).random(n, dtype=np.float32) for n in SIZES]
    ledger = Ledger(tempfile.mkdtemp(), 0, 1, None)
    ledger_us, fp_us = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            for layer in (2, 1, 0):
                rec = ledger.enter(step, layer, "native", bufs[layer].nbytes)
                ledger.leave(rec, fingerprint(bufs[layer]), 0.0, None)
        ledger_us.append((time.perf_counter() - t0) / args.steps * 1e6)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            for b in bufs:
                fingerprint(b)
        fp_us.append((time.perf_counter() - t0) / args.steps * 1e6)
    print(f"ledger per step: median {statistics.median(ledger_us):.1f} us "
          f"(of which fingerprints {statistics.median(fp_us):.1f} us), {args.repeats} repeats")


if __name__ == "__main__":
    main()
