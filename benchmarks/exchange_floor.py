"""The floor under any allreduce driven from Python at P = 2: bare mpi4py exchanges.

Native ``Allreduce`` against the two message patterns the own algorithms use at P = 2,
written with nothing but mpi4py and NumPy (no header, no checksum, no deadline, no
bookkeeping): one round (exchange whole buffers and add: recursive doubling) and two rounds
(reduce-scatter then allgather: the ring).  Interleaved; time = median of the max over ranks.

    mpiexec -n 2 python benchmarks/exchange_floor.py [--sizes 4K,64K,1M] [--iters 2000]
    python benchmarks/exchange_floor.py --passes [--sizes 4M,16M,64M]

``--passes`` (one process, no MPI traffic) times the memory passes one rank of a P = 2 ring
makes over its data, in CPU time (``time.process_time``, so other processes on a busy box
shift it far less than a wall-clock A/B): the peer's single-copy (CMA) transfer is modelled
by a copy from a second buffer.  "whole": checksum each payload in one pass before sending
and after receiving (the transport before segments); "segments": receive 512 KiB segments,
checksum and add each at once, checksum the sums (the transport now); each with and without
the xxh3 checks.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpitrain.tools.bench_allreduce import parse_size  # noqa: E402


def passes(nbytes: int, iters: int = 40, seg_bytes: int = 1 << 19) -> dict[str, float]:
    """Median CPU seconds of one P = 2 ring rank's passes over memory (see --passes)."""
    import xxhash
    hash_all = xxhash.xxh3_64_intdigest
    h = nbytes // 8
    buf, peer = np.ones(2 * h, np.float32), np.ones(2 * h, np.float32)
    mine, theirs, scratch = buf[:h], buf[h:], np.empty(h, np.float32)
    landing, bounds = np.empty(seg_bytes // 4, np.float32), range(0, h, seg_bytes // 4)

    def check_all(data, check):
        if check:
            hash_all(data)

    def whole(check):
        check_all(theirs, check)                  # send: the reduce-scatter chunk
        np.copyto(scratch, peer[:h])              # receive it from the peer
        check_all(scratch, check)
        np.add(mine, scratch, out=mine)
        check_all(mine, check)                    # send: the reduced chunk
        np.copyto(theirs, peer[h:])               # receive the peer's reduced chunk
        check_all(theirs, check)

    def segments(check):
        got, summed, gathered = (xxhash.xxh3_64() for _ in range(3))
        check_all(theirs, check)
        for a in bounds:
            part, dest = landing[:min(h, a + landing.size) - a], mine[a:a + landing.size]
            np.copyto(part, peer[a:a + part.size])
            if check:
                got.update(part)
            np.add(dest, part, out=dest)
            if check:
                summed.update(dest)               # the reduced chunk's checksum, for its send
        for a in bounds:
            dest = theirs[a:a + landing.size]
            np.copyto(dest, peer[h + a:h + a + dest.size])
            if check:
                gathered.update(dest)

    variants = {f"{name}{'' if check else ' unchecked'}": (f, check)
                for name, f in (("whole", whole), ("segments", segments)) for check in (1, 0)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(iters):
        for k, (f, check) in variants.items():
            buf[:] = 1
            t0 = time.process_time()
            f(check)
            times[k].append(time.process_time() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4K,64K,1M")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--passes", action="store_true", help="one rank's memory passes, no MPI")
    args = ap.parse_args()
    if args.passes:
        for nbytes in (parse_size(s) for s in args.sizes.split(",")):
            print(f"{nbytes:>9} B: " + "   ".join(
                f"{k} {v * 1e3:6.2f} ms" for k, v in passes(nbytes).items()), flush=True)
        return 0
    comm = MPI.COMM_WORLD.Dup()
    if comm.Get_size() != 2:
        sys.exit("run with exactly 2 ranks")
    r, o = comm.Get_rank(), 1 - comm.Get_rank()
    for nbytes in (parse_size(s) for s in args.sizes.split(",")):
        n = max(2, nbytes // 4)
        buf, tmp = np.ones(n, np.float32), np.empty(n, np.float32)
        h = n // 2
        mine, theirs = (buf[:h], buf[h:]) if r == 0 else (buf[h:], buf[:h])

        def native():
            comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)

        def one_round():
            MPI.Request.Waitall([comm.Irecv(tmp, o, 1), comm.Isend(buf, o, 1)])
            np.add(buf, tmp, out=buf)

        def two_rounds():
            part = tmp[:mine.size]
            MPI.Request.Waitall([comm.Irecv(part, o, 1), comm.Isend(theirs, o, 1)])
            np.add(mine, part, out=mine)
            MPI.Request.Waitall([comm.Irecv(theirs, o, 2), comm.Isend(mine, o, 2)])

        variants = {"native": native, "one round": one_round, "two rounds": two_rounds}
        times = {k: [] for k in variants}
        iters = max(20, int(args.iters * min(1.0, 65536 / max(nbytes, 1))))
        for _ in range(iters):
            for k, f in variants.items():
                buf[:] = 1
                comm.Barrier()
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {}
        for k, ts in times.items():
            worst = np.array(ts[iters // 10:])
            comm.Allreduce(MPI.IN_PLACE, worst, MPI.MAX)
            med[k] = float(np.median(worst))
        if r == 0:
            print(f"{nbytes:>9} B: " + "   ".join(
                f"{k} {v * 1e6:8.1f} us ({v / med['native']:.2f}x)" for k, v in med.items()),
                flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
