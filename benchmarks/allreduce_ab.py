"""Interleaved A/B of allreduce implementations: native, the harness's algorithms, and
(optionally) the same algorithms from an older checkout of mpitrain/comm.

    mpiexec -n 2 python benchmarks/allreduce_ab.py [--old /tmp/oldtree] [--algorithms ring]
        [--deliveries strict,lossy] [--checksums xxh3,crc32c,none] [--segments 256K,1M]
        [-b 4 -e 64M -f 4] [--iters 20] [--warmup 5]

For each size, every variant runs one iteration in turn (native, ring/strict, old ring/strict,
...), ``--iters`` times after ``--warmup``, so load drift on a shared box hits all alike.  An
iteration is timed like ``mpitrain bench allreduce`` (Barrier, then start+wait) and its time
is the max over ranks; the table gives medians (``--stat min``: minima, the iterations a busy
box disturbed least), busbw and each variant's time / native.
``--old DIR`` loads DIR/mpitrain/comm/{segments,transport,allreduce}.py as separate modules (e.g. a
``git archive HEAD | tar -x -C DIR`` taken before a change).  ``--segments`` adds, per size
listed, variants whose split payloads travel in segments of that size
(``mpitrain.comm.segments.SEGMENT_BYTES``, set before each of their iterations).
``--unhashed`` adds, beside each xxh3 variant, one whose xxh3 calls return 0 during its
iterations (the xxhash module swapped in ``mpitrain.comm.wire``): the checked path without
the hashing, so the difference to xxh3 is what the hashing itself costs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpitrain.tools.bench_allreduce import parse_size, sweep_sizes  # noqa: E402
from mpitrain.comm import allreduce as new_ar  # noqa: E402
from mpitrain.comm import segments  # noqa: E402
from mpitrain.comm import transport as new_tr  # noqa: E402
from mpitrain.comm import wire  # noqa: E402


class Unhashed:
    """Stands in for the xxhash module in mpitrain.comm.wire: the same calls, no hashing."""

    class xxh3_64:
        def __init__(self, *args) -> None:
            pass

        def update(self, data) -> None:
            pass

        def intdigest(self) -> int:
            return 0

    @staticmethod
    def xxh3_64_intdigest(data) -> int:
        return 0


def load_old(root: str):
    """(transport module, allreduce module) from an older checkout, imported side by side."""
    def load(name, path, patch=None):
        src = Path(path).read_text()
        if patch:
            src = src.replace(*patch)
        spec = importlib.util.spec_from_loader(name, loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        exec(compile(src, path, "exec"), mod.__dict__)
        return mod
    patch = None
    if Path(f"{root}/mpitrain/comm/segments.py").exists():  # the old tree's, not this one's
        load("old_segments", f"{root}/mpitrain/comm/segments.py")
        patch = ("from mpitrain.comm.segments import", "from old_segments import")
    tr = load("old_transport", f"{root}/mpitrain/comm/transport.py", patch)
    ar = load("old_allreduce", f"{root}/mpitrain/comm/allreduce.py",
              ("from mpitrain.comm.transport import", "from old_transport import"))
    return tr, ar


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old")
    ap.add_argument("--algorithms", default="ring")
    ap.add_argument("--deliveries", default="strict")
    ap.add_argument("--checksums", default="xxh3",
                    help="xxh3, crc32c and/or none ([faults] checksum; current tree only)")
    ap.add_argument("--segments", default="",
                    help="segment sizes to compare (current tree, first checksum only)")
    ap.add_argument("--unhashed", action="store_true",
                    help="add xxh3 variants whose hashing is skipped (see the docstring)")
    ap.add_argument("-b", "--minbytes", default="4")
    ap.add_argument("-e", "--maxbytes", default="64M")
    ap.add_argument("-f", "--stepfactor", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    rank, size = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(np.float32)
    mods = {"": (new_tr, new_ar)}
    if args.old:
        mods["old "] = load_old(args.old)
    variants = {"native": new_ar.make_allreducer("native", comm, None)}
    for algo in args.algorithms.split(","):
        for delivery in args.deliveries.split(","):
            for tag, (tr, ar) in mods.items():
                for csum in args.checksums.split(",") if not tag else ["old"]:
                    if csum == "none" and delivery == "reliable":
                        continue  # reliable delivery needs checksums (it resends corruption)
                    extra = {} if csum == "old" else {"checksum": csum}
                    t = tr.Transport(comm, delivery=delivery, deadline_s=60.0, **extra)
                    name = f"{tag}{algo}/{delivery}" + ("" if csum == "old" else f"/{csum}")
                    variants[name] = ar.make_allreducer(algo, comm, t)
                    if args.unhashed and csum == "xxh3" and not tag:
                        t = tr.Transport(comm, delivery=delivery, deadline_s=60.0, **extra)
                        variants[f"{name}-unhashed"] = ar.make_allreducer(algo, comm, t)
            for seg in filter(None, args.segments.split(",")):
                csum = args.checksums.split(",")[0]
                t = new_tr.Transport(comm, delivery=delivery, deadline_s=60.0, checksum=csum)
                variants[f"{algo}/{delivery}/{csum}/seg{seg}"] = (
                    parse_size(seg), new_ar.make_allreducer(algo, comm, t))
    counts = sweep_sizes(parse_size(args.minbytes), parse_size(args.maxbytes), args.stepfactor, dtype.itemsize)
    rows = []
    default_segment = segments.SEGMENT_BYTES
    hashing = wire.xxhash
    if rank == 0:
        print(f"# {size} ranks, float32, {args.iters} interleaved iterations (+{args.warmup}); "
              f"time = {args.stat} over iterations of the max over ranks")
        print(f"# {'bytes':>10} " + " ".join(f"{v:>24}" for v in variants))
    for li, count in enumerate(counts):
        src = (np.arange(count, dtype=np.float64) % 97 + rank).astype(dtype)
        want = sum((np.arange(count, dtype=np.float64) % 97 + r).astype(dtype) for r in range(size))
        times = {v: [] for v in variants}
        wrong = 0
        buf = np.empty_like(src)
        for it in range(args.warmup + args.iters):
            for name, ar in variants.items():
                segments.SEGMENT_BYTES = default_segment
                if isinstance(ar, tuple):
                    segments.SEGMENT_BYTES, ar = ar
                wire.xxhash = Unhashed if name.endswith("-unhashed") else hashing
                buf[:] = src
                comm.Barrier()
                t0 = time.perf_counter()
                ar.wait(ar.start(buf, it + 1, li))
                dt = time.perf_counter() - t0
                if it >= args.warmup:
                    times[name].append(dt)
                wrong += int(np.count_nonzero(buf != want))
        med = {}
        for name, ts in times.items():
            tmax = np.array(ts)
            comm.Allreduce(MPI.IN_PLACE, tmax, op=MPI.MAX)
            med[name] = float(statistics.median(tmax) if args.stat == "median" else min(tmax))
        wrong = comm.allreduce(wrong, op=MPI.SUM)
        nbytes = count * dtype.itemsize
        row = {"bytes": nbytes, "wrong": wrong,
               **{f"{k}_s": v for k, v in med.items()},
               **{f"{k}_busbw_GBps": nbytes / v / 1e9 * 2 * (size - 1) / size for k, v in med.items()}}
        rows.append(row)
        if rank == 0:
            cells = []
            for name, v in med.items():
                rel = "" if name == "native" else f" {v / med['native']:5.2f}x"
                cells.append(f"{v * 1e6:10.1f}us{rel:>7} {nbytes / v / 1e9 * 2 * (size - 1) / size:5.2f}")
            print(f"  {nbytes:>10} " + " ".join(f"{c:>24}" for c in cells) + f"  wrong={wrong}",
                  flush=True)
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ranks": size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
