"""``mpitrain bench allreduce``: an nccl-tests style sweep of the allreduce algorithms.

For each message size (``--min-bytes`` .. ``--max-bytes``, times ``--step-factor``) and each
algorithm, ``--warmup`` untimed then ``--iters`` timed in-place SUM allreduces.  Per size:
time = median over iterations of each rank's time, then the maximum over ranks;
``algbw = bytes / time``; ``busbw = algbw * 2(P-1)/P`` (the per-link traffic of a
bandwidth-optimal allreduce, comparable across rank counts); ``#wrong`` = elements that
differ from the exact sum (summed over ranks, worst iteration).  Every rank fills its buffer
with small integers derived from (rank, index), so the float sum is exact and any wrong
element is a real error.  ``redtime`` is this rank's cost of a local ``np.add`` of the same
size (the reduction term gamma of ``mpitrain simulate``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from .. import checkpoint, config
from ..context import RankContext, World
from ..errors import ConfigError
from ..schema import ALGORITHMS
from . import progress
from .rank_argparse import RankArgumentParser

DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64}


def parser() -> argparse.ArgumentParser:
    p = RankArgumentParser(prog="mpitrain bench allreduce",
                           description="nccl-tests style allreduce sweep over message sizes "
                                       "and algorithms")
    p.add_argument("-b", "--min-bytes", type=parse_size, default=4, help="smallest message (4)")
    p.add_argument("-e", "--max-bytes", type=parse_size, default=64 << 20, help="largest (64M)")
    p.add_argument("-f", "--step-factor", type=int, default=4, help="size multiplier (4)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per size (20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per size (5)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated subset of " + ",".join(ALGORITHMS))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="element type of the buffers (float32)")
    p.add_argument("--max-seconds", type=float, default=2.0,
                   help="cap on timed seconds per size and algorithm: big sizes of slow "
                        "algorithms run fewer iterations (at least 3); 0 = no cap")
    p.add_argument("--deadline", type=float, default=60.0,
                   help="transport receive deadline in seconds (own algorithms)")
    p.add_argument("--checksum", default="xxh3", choices=("xxh3", "crc32c", "none", "both"),
                   help="message checksums of the own algorithms ([faults] checksum); both: "
                        "run each own algorithm with xxh3 and without (rows 'ALG' and "
                        "'ALG:nosum')")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    progress.add_option(p)
    return p


def parse_size(text: str) -> int:
    """A byte count as written on the command line: 4, 1K, 64M, 1GiB."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4, 1K, 64M)") from None


def sweep_sizes(min_bytes: int, max_bytes: int, factor: int, itemsize: int) -> list[int]:
    """Element counts of the sweep (at least one element each, no repeats)."""
    if factor < 2:
        raise ConfigError("--step-factor must be >= 2")
    if min_bytes < 1 or max_bytes < min_bytes:
        raise ConfigError(f"need 1 <= --min-bytes <= --max-bytes, got {min_bytes}, {max_bytes}")
    counts: list[int] = []
    b = min_bytes
    while b <= max_bytes:
        c = max(1, b // itemsize)
        if not counts or c != counts[-1]:
            counts.append(c)
        b *= factor
    return counts


def fill_pattern(rank: int, count: int, dtype) -> np.ndarray:
    """Rank ``rank``'s input: small integers in [-8, 8] from (rank, index), exact in any dtype."""
    idx = np.arange(count, dtype=np.int64)
    return (((idx * 7 + rank * 13 + (idx >> 5) * 3) % 17) - 8).astype(dtype)


def expected_sum(size: int, count: int, dtype) -> np.ndarray:
    total = np.zeros(count, np.int64)
    for r in range(size):
        total += fill_pattern(r, count, np.int64)
    return total.astype(dtype)


# --------------------------------------------------------------------------- the command
def prepare(argv: list[str], env: dict[str, str]) -> tuple:
    """Parse and check the options (local, may fail: call inside ``collective_errors``)."""
    args = parser().parse_args(argv)
    algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGORITHMS]
    if bad or not algos:
        raise ConfigError(f"--algorithms {args.algorithms}: unknown {', '.join(bad)}; "
                          f"choose from {', '.join(ALGORITHMS)}")
    if args.iters < 1 or args.warmup < 0:
        raise ConfigError("--iters must be >= 1 and --warmup >= 0")
    dtype = np.dtype(DTYPES[args.dtype])
    counts = sweep_sizes(args.min_bytes, args.max_bytes, args.step_factor, dtype.itemsize)
    return args, algos, dtype, counts, env


def run(world: World, prepared: tuple) -> int:
    """Collective: the sweep; rank 0 prints the table (and writes --json).  Exit status:
    1 on rank 0 when any sum was wrong, else 0."""
    args, algos, dtype, counts, env = prepared
    ctx = _connect(world, env)
    if ctx.rank == 0:
        _print_header(world.size, dtype, args.iters, args.warmup)
    bar = progress.Progress(args.progress, _sweep_work(algos, args.checksum, counts, dtype),
                            active=ctx.rank == 0, desc="bench allreduce")

    def print_row(row: dict) -> None:
        bar.print(_row_text(row))
        bar.advance(_work(row["bytes"]))

    try:
        rows = run_allreduce_sweep(ctx.comm, algos, dtype, counts, args.iters, args.warmup,
                                   args.deadline, args.max_seconds,
                                   print_row=print_row if ctx.rank == 0 else None,
                                   checksum=args.checksum, oversubscribed=ctx.oversubscribed)
    finally:
        bar.close()
        ctx.close()
    if world.rank != 0:
        return 0
    wrong = sum(r["wrong"] for r in rows)
    busbw = [r["busbw_GBps"] for r in rows if r["bytes"] >= (1 << 20)]
    print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    if busbw:
        print(f"# Avg bus bandwidth (>= 1 MiB) : {statistics.fmean(busbw):.4f} GB/s")
    if args.json:
        _write_json(Path(args.json), world.size, dtype, args, rows)
    return 0 if wrong == 0 else 1


def _work(nbytes: int) -> int:
    """The progress bar's estimate of one size's cost: its bytes plus a per-message
    latency worth about 64 KiB (alpha-beta), so the ETA holds from small sizes to big."""
    return nbytes + (64 << 10)


def _sweep_work(algos: list[str], checksum: str, counts: list[int], dtype: np.dtype) -> int:
    """The work of the whole sweep in :func:`_work` units (own algorithms run twice with
    ``--checksum both``)."""
    runs = sum(1 if a == "native" or checksum != "both" else 2 for a in algos)
    return runs * sum(_work(c * dtype.itemsize) for c in counts)


def _connect(world: World, env: dict[str, str], blas_threads: int = 1) -> RankContext:
    """Collective: a RankContext with the harness's own (duplicated) communicator."""
    cfg = config.load(None, [f"run.blas_threads={blas_threads}"], {})
    ctx = RankContext.create(world, cfg, env)
    ctx.connect(world)
    return ctx


def _write_json(path: Path, ranks: int, dtype: np.dtype, args, rows: list[dict]) -> None:
    from mpi4py import MPI
    doc = {"benchmark": "allreduce", "ranks": ranks, "dtype": dtype.name,
           "iters": args.iters, "warmup": args.warmup,
           "mpi": MPI.Get_library_version().splitlines()[0].strip(),
           "host": os.uname().nodename, "cpus": os.cpu_count(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows}
    checkpoint.write_text(path, json.dumps(doc, indent=1) + "\n")


# --------------------------------------------------------------------------- the sweep
def run_allreduce_sweep(comm, algos, dtype, counts, iters, warmup, deadline_s=60.0,
                        max_seconds=0.0, print_row=None,
                        checksum: str = "xxh3", oversubscribed: bool = False) -> list[dict]:
    """Collective: time every (algorithm, count) pair on ``comm``; rows (same on every rank).

    ``checksum``: "xxh3", "crc32c" or "none" for the own algorithms' messages, or "both" (each own
    algorithm twice; rows carry ``checksum``).  ``oversubscribed``: more ranks than cores
    on the node (shorter spins while waiting, see ``comm.waiting.spin_budget``)."""
    from ..comm.allreduce import make_allreducer
    from ..comm.transport import Transport
    sums = ["xxh3", "none"] if checksum == "both" else [checksum]
    runs = [(a, "-" if a == "native" else c) for a in algos for c in (["-"] if a == "native" else sums)]
    rows = []
    for algo, csum in runs:
        transport = None if algo == "native" else Transport(comm, delivery="strict",
                                                            deadline_s=deadline_s,
                                                            checksum=csum,
                                                            oversubscribed=oversubscribed)
        ar = make_allreducer(algo, comm, transport, oversubscribed=oversubscribed)
        for li, count in enumerate(counts):
            row = {"algorithm": algo, "checksum": csum,
                   **_time_one_size(comm, ar, li, count, dtype, iters, warmup, max_seconds)}
            rows.append(row)
            if print_row:
                print_row(row)
        if transport is not None:
            transport.close()
        comm.Barrier()
    return rows


def _time_one_size(comm, ar, li: int, count: int, dtype, iters: int, warmup: int,
                   max_seconds: float) -> dict:
    """Collective: the measurements of one allreducer at one size (``li``: its layer id)."""
    from mpi4py import MPI
    rank, size = comm.Get_rank(), comm.Get_size()
    src = fill_pattern(rank, count, dtype)
    want = expected_sum(size, count, dtype)
    buf = np.empty_like(src)
    times, worst = [], 0
    n_iter = iters
    for it in range(warmup + iters):
        if it >= warmup + n_iter:
            break
        buf[:] = src
        comm.Barrier()
        t0 = time.perf_counter()
        ar.wait(ar.start(buf, it + 1, li))
        dt = time.perf_counter() - t0
        worst = max(worst, int(np.count_nonzero(buf != want)))
        if it >= warmup:
            times.append(dt)
            if it == warmup and max_seconds > 0:  # agree on a cap from the first timing
                first = comm.allreduce(dt, op=MPI.MAX)
                n_iter = int(min(iters, max(3, max_seconds // max(first, 1e-9))))
    med = statistics.median(times)
    red = _reduction_times(buf, src.copy(), len(times))
    t = comm.allreduce(med, op=MPI.MAX)
    tmin = comm.allreduce(min(times), op=MPI.MAX)
    wrong = comm.allreduce(worst, op=MPI.SUM)
    redt = comm.allreduce(statistics.median(red), op=MPI.MAX)
    nbytes = count * dtype.itemsize
    algbw = nbytes / t / 1e9
    return {"bytes": nbytes, "count": count, "dtype": dtype.name,
            "ranks": size, "time_s": t, "time_us": t * 1e6, "min_time_s": tmin,
            "iters": len(times), "algbw_GBps": algbw,
            "busbw_GBps": algbw * 2 * (size - 1) / size, "wrong": wrong,
            "reduce_s": redt}


def _reduction_times(buf: np.ndarray, other: np.ndarray, timed: int) -> list[float]:
    """The local reduction cost (gamma): seconds of np.add of two buffers of this size."""
    red = []
    for _ in range(min(5, max(1, timed))):
        t0 = time.perf_counter()
        np.add(buf, other, out=buf)
        red.append(time.perf_counter() - t0)
    return red


def _print_header(size: int, dtype: np.dtype, iters: int, warmup: int) -> None:
    print(f"# mpitrain bench allreduce: {size} ranks, dtype {dtype.name}, "
          f"{iters} iters (+{warmup} warm-up), in-place SUM")
    print(f"# {'size(B)':>12} {'count':>10} {'type':>8} {'algorithm':>18} "
          f"{'time(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>7} "
          f"{'redtime(us)':>11}", flush=True)


def _row_text(r: dict) -> str:
    label = r["algorithm"] + (":nosum" if r.get("checksum") == "none" else "")
    return (f"  {r['bytes']:>12} {r['count']:>10} {r['dtype']:>8} {label:>18} "
            f"{r['time_us']:>10.1f} {r['algbw_GBps']:>11.4f} {r['busbw_GBps']:>11.4f} "
            f"{r['wrong']:>7} {r['reduce_s'] * 1e6:>11.1f}")
