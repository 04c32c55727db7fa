"""The floor under any allreduce driven from Python at P = 2: bare mpi4py exchanges.

Native ``Allreduce`` against the two message patterns the own algorithms use at P = 2,
written with nothing but mpi4py and NumPy (no header, no checksum, no deadline, no
bookkeeping): one round (exchange whole buffers and add: recursive doubling) and two rounds
(reduce-scatter then allgather: the ring).  Interleaved; time = median of the max over ranks.

    mpiexec -n 2 python benchmarks/exchange_floor.py [--sizes 4K,64K,1M] [--iters 2000]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpitrain.tools.bench_allreduce import parse_size  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4K,64K,1M")
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
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
