"""Every own algorithm equals native MPI on 1..8 ranks.

One mpiexec per rank count; the driver (tests/comm_driver.py allreduce) checks
all cases inside: lengths 0, 1, < p, p, p+1, odd and larger, float32 and
float64, against native within float rounding, bitwise identical on every
rank, bitwise identical on a second run; plus ring in reliable mode and tree
in lossy mode without faults.

The driver's buffers are all small enough to travel inline (header and payload in one
message); ``test_large_buffers`` runs this file under mpiexec to check buffers whose
chunks travel as a header plus a separate, zero-copy payload (transport.INLINE_MAX).
"""
from __future__ import annotations

import sys

import pytest

from mpirun import REPO, mpiexec

DRIVER = str(REPO / "tests" / "comm_driver.py")


@pytest.mark.parametrize("nprocs", range(1, 9))
def test_algorithms_equal_native(nprocs):
    res = mpiexec(nprocs, [DRIVER, "allreduce"], timeout=90)
    assert res.returncode == 0, res.output[-3000:]
    assert f"ALLREDUCE OK p={nprocs}" in res.stdout


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_large_buffers(nprocs):
    res = mpiexec(nprocs, [__file__, "large"], timeout=120)
    assert res.returncode == 0, res.output[-3000:]
    assert f"LARGE OK p={nprocs}" in res.stdout


def _large() -> None:
    """Under mpiexec: own algorithms on buffers above INLINE_MAX, every delivery mode."""
    import zlib

    import numpy as np
    from mpi4py import MPI

    sys.path.insert(0, str(REPO))
    from mpitrain.comm.allreduce import make_allreducer
    from mpitrain.comm.transport import INLINE_MAX, Transport

    comm = MPI.COMM_WORLD.Dup()
    p, r = comm.Get_size(), comm.Get_rank()
    step = 0
    for delivery, checksum in (("strict", True), ("strict", False), ("reliable", True),
                               ("lossy", True)):
        for algo in ("ring", "recursive_doubling", "tree"):
            # each transport on its own communicator, as in a job: a reliable transport may
            # close with a superseded retransmission still on its way, never for the next one
            own = comm.Dup()
            ar = make_allreducer(algo, own, Transport(own, delivery=delivery, deadline_s=20,
                                                      checksum=checksum))
            for dtype in (np.float32, np.float64):
                for n in (INLINE_MAX // 4 * p + 7, 3 * INLINE_MAX + 1, 1 << 20):
                    step += 1
                    x = np.random.default_rng([r, n, step]).standard_normal(n).astype(dtype)
                    ref = x.copy()
                    comm.Allreduce(MPI.IN_PLACE, ref, MPI.SUM)
                    outs = []
                    for rep in range(2):
                        y = x.copy()
                        ar.wait(ar.start(y, step, rep))
                        outs.append(y)
                    where = f"{algo}/{delivery}/{checksum} p={p} n={n} {np.dtype(dtype).name}"
                    bound = 2 * p * np.finfo(dtype).eps * comm.allreduce(np.abs(x).astype(np.float64), MPI.SUM)
                    ok = (np.array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8))
                          and bool(np.all(np.abs(outs[0] - ref) <= bound)))
                    crcs = comm.allgather(zlib.crc32(outs[0].view(np.uint8)))
                    if not ok or len(set(crcs)) != 1:
                        sys.stderr.write(f"rank {r}: {where}: wrong or not bitwise identical\n")
                        comm.Abort(1)
            ar.transport.close()
    comm.Barrier()
    if r == 0:
        print(f"LARGE OK p={p} cases={step}", flush=True)


@pytest.mark.parametrize("nprocs", [2, 3])
def test_ranks_with_different_checksum_settings_are_told_so(nprocs):
    res = mpiexec(nprocs, [__file__, "mixed"], timeout=60)
    assert res.returncode == 0, res.output[-3000:]
    assert f"MIXED OK p={nprocs}" in res.stdout


def _mixed() -> None:
    """Under mpiexec: rank 0 sends without checksums, the others with; inline and split
    payloads.  Every rank must raise the same SyncError saying so, not "corrupted"."""
    import numpy as np
    from mpi4py import MPI

    sys.path.insert(0, str(REPO))
    from mpitrain.comm.allreduce import make_allreducer
    from mpitrain.comm.transport import INLINE_MAX, Transport
    from mpitrain.errors import SyncError

    world = MPI.COMM_WORLD
    for n in (64, 4 * INLINE_MAX):
        comm = world.Dup()
        t = Transport(comm, deadline_s=5, grace_s=0.3, checksum=comm.Get_rank() != 0)
        try:
            make_allreducer("ring", comm, t).start(np.ones(n, np.float32), 1, 0)
            msg = "no error"
        except SyncError as err:
            msg = str(err)
        msgs = world.allgather(msg)
        if len(set(msgs)) != 1 or "use different message checksums" not in msgs[0]:
            sys.stderr.write(f"n={n}: {msgs}\n")
            world.Abort(1)
    if world.Get_rank() == 0:
        print(f"MIXED OK p={world.Get_size()}", flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["large"]:
    _large()
if __name__ == "__main__" and sys.argv[1:] == ["mixed"]:
    _mixed()
