"""What the payload checks cost on this machine: each ``[faults] checksum`` in GB/s.

    python benchmarks/hash_rates.py [--sizes 64K,512K,2M,32M] [--seconds 0.2]

Every checksummed byte is hashed twice (sender, receiver), and a P = 2 ring hashes about
two bytes per byte it reduces, on the same core that copies them (docs/performance.md §4).
So the rate here decides what checks cost against the transfer: on a box whose MPI moves
3 GB/s through shared memory, checks cost about 2 x 3 / rate of the collective's time.

Rows: the transport's checksums (one-shot, and streamed in 512 KiB segments as a receiver
checks them: ``comm/wire.py`` ``Running``), and, for scale, a copy and NumPy's sum of the
bytes as 64-bit words (the speed of one vectorized pass; as a checksum it would miss
reordered and compensating changes).  512 KiB and 2 MiB stay in cache; the largest size
reads memory.  Median of 5 timings of ``--seconds`` each.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from mpitrain.comm.segments import SEGMENT_BYTES  # noqa: E402
from mpitrain.comm.wire import CHECKSUMS, Running  # noqa: E402
from mpitrain.tools.bench_allreduce import parse_size  # noqa: E402


def rate(fn, nbytes: int, seconds: float) -> float:
    """GB/s of ``fn()`` over ``nbytes``: median of 5 timings of about ``seconds`` each."""
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 10 or reps < 2:
        fn()
        reps += 1
    reps = max(1, int(reps * 10))
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        timings.append((time.perf_counter() - t0) / reps)
    return nbytes / float(np.median(timings)) / 1e9


def streamed(kind: str, data: np.ndarray):
    def run() -> int:
        running = Running(kind)
        for a in range(0, data.size, SEGMENT_BYTES):
            running.update(data[a:a + SEGMENT_BYTES])
        return running.value()
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64K,512K,2M,32M")
    ap.add_argument("--seconds", type=float, default=0.2, help="per timing (default 0.2)")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    data = np.random.default_rng(0).integers(0, 256, max(sizes), dtype=np.uint8)
    out = np.empty_like(data)
    rows: dict[str, list[float]] = {}
    for nbytes in sizes:
        buf = data[:nbytes]
        variants = {f"{name}": (lambda f=fn, b=buf: f(b)) for name, (fn, _) in CHECKSUMS.items()}
        variants.update({f"{name} streamed": streamed(name, buf) for name in ("xxh3", "crc32c")})
        variants["copy"] = lambda b=buf, o=out[:nbytes]: np.copyto(o, b)
        variants["sum of u64 words"] = lambda b=buf[:nbytes // 8 * 8]: np.add.reduce(
            b.view(np.uint64))
        for name, fn in variants.items():
            rows.setdefault(name, []).append(rate(fn, nbytes, args.seconds))
    head = "".join(f"{s:>10}" for s in args.sizes.split(","))
    print(f"# GB/s by buffer size (median of 5)\n{'':<18}{head}")
    for name, rates in rows.items():
        print(f"{name:<18}" + "".join(f"{r:>10.1f}" for r in rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
