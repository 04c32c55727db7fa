"""Benchmarks: ``mpitrain bench allreduce`` and ``mpitrain bench train``.

bench allreduce
    An nccl-tests style sweep: for each message size (``--min-bytes`` .. ``--max-bytes``,
    times ``--step-factor``) and each algorithm, ``--warmup`` untimed then ``--iters`` timed
    in-place SUM allreduces.  Per size: time = median over iterations of each rank's time,
    then the maximum over ranks; ``algbw = bytes / time``; ``busbw = algbw * 2(P-1)/P`` (the
    per-link traffic of a bandwidth-optimal allreduce, comparable across rank counts);
    ``#wrong`` = elements that differ from the exact sum (summed over ranks, worst iteration).
    Every rank fills its buffer with small integers derived from (rank, index), so the float
    sum is exact and any wrong element is a real error.  ``redtime`` is this rank's cost of a
    local ``np.add`` of the same size (the reduction term gamma of ``mpitrain simulate``).

bench train
    Runs a job through ``train.setup``/``train.run`` (progress off, output in a temporary
    folder unless ``run.out`` is set) and reads its ``metrics.jsonl``: medians after warm-up
    of compute, communication wait and total per step, steps/s and samples/s.  With
    ``--compare-overlap`` it runs the job with overlap on and off, interleaved ``--repeat``
    times, and reports the communication left on the critical path: wait(on) / wait(off).

Both run under ``mpiexec`` (one process per rank) or re-launch themselves with ``-n P``.
The MPI communicator comes from :mod:`mpitrain.context` like every other command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import checkpoint
from ..errors import ConfigError, MpitrainError
from ..launch import exec_under_mpiexec
from ..session import session

ALGORITHMS = ("native", "ring", "recursive_doubling", "tree")
DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64}


class _Parser(argparse.ArgumentParser):
    """argparse that raises (so only rank 0 prints the message) instead of exiting."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------- launching
def _strip_np(argv: list[str]) -> tuple[int | None, list[str]]:
    """Take ``-n P`` / ``--np P`` / ``-nP`` out of ``argv``."""
    out, nprocs, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a in ("-n", "--np") and i + 1 < len(argv):
            nprocs, i = argv[i + 1], i + 2
            continue
        if a.startswith("--np="):
            nprocs = a.split("=", 1)[1]
        elif a.startswith("-n") and a[2:].isdigit():
            nprocs = a[2:]
        else:
            out.append(a)
        i += 1
    if nprocs is not None and not str(nprocs).isdigit():
        raise ConfigError(f"-n {nprocs}: expected a number of ranks")
    return (int(nprocs) if nprocs is not None else None), out


def _connect(world, env, blas_threads: int = 1):
    """A RankContext with the harness's own (duplicated) communicator."""
    from .. import context
    cfg = SimpleNamespace(run=SimpleNamespace(blas_threads=blas_threads, device="cpu", seed=0))
    ctx = context.RankContext.create(world, cfg, env)
    ctx.connect(world)
    return ctx


def _entry(sub: str, argv: list[str], body) -> int:
    """Common entry: ``-n P`` relaunch, else the session (MPI start, errors, exit codes)."""
    nprocs, argv = _strip_np(list(argv))
    if nprocs is not None:
        exec_under_mpiexec(nprocs, ["-m", "mpitrain", "bench", sub, *argv])
    with session() as world:
        with world.collective_errors():
            prepared = body.prepare(argv)
        return body.run(world, world.env, prepared)


# --------------------------------------------------------------------------- allreduce
def allreduce_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpitrain bench allreduce",
                description="nccl-tests style allreduce sweep over message sizes and algorithms")
    p.add_argument("-b", "--min-bytes", type=_size, default=4, help="smallest message (4)")
    p.add_argument("-e", "--max-bytes", type=_size, default=64 << 20, help="largest (64M)")
    p.add_argument("-f", "--step-factor", type=int, default=4, help="size multiplier (4)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per size (20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per size (5)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated subset of " + ",".join(ALGORITHMS))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--max-seconds", type=float, default=2.0,
                   help="cap on timed seconds per size and algorithm: big sizes of slow "
                        "algorithms run fewer iterations (at least 3); 0 = no cap")
    p.add_argument("--deadline", type=float, default=60.0,
                   help="transport receive deadline in seconds (own algorithms)")
    p.add_argument("--checksum", default="crc32c", choices=("crc32c", "none", "both"),
                   help="message checksums of the own algorithms ([faults] checksum); both: "
                        "run each own algorithm with and without (rows 'ALG' and 'ALG:nosum')")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def _size(text: str) -> int:
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
    counts, b = [], min_bytes
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


class _AllreduceBench:
    def prepare(self, argv):
        args = allreduce_parser().parse_args(argv)
        algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        bad = [a for a in algos if a not in ALGORITHMS]
        if bad or not algos:
            raise ConfigError(f"--algorithms {args.algorithms}: unknown {', '.join(bad)}; "
                              f"choose from {', '.join(ALGORITHMS)}")
        if args.iters < 1 or args.warmup < 0:
            raise ConfigError("--iters must be >= 1 and --warmup >= 0")
        dtype = np.dtype(DTYPES[args.dtype])
        counts = sweep_sizes(args.min_bytes, args.max_bytes, args.step_factor, dtype.itemsize)
        return args, algos, dtype, counts

    def run(self, world, env, prepared):
        args, algos, dtype, counts = prepared
        ctx = _connect(world, env)
        try:
            rows = run_allreduce_sweep(ctx.comm, algos, dtype, counts, args.iters, args.warmup,
                                       args.deadline, args.max_seconds,
                                       print_row=_print_row if ctx.rank == 0 else None,
                                       header=ctx.rank == 0, checksum=args.checksum,
                                       oversubscribed=ctx.oversubscribed)
        finally:
            ctx.close()
        if world.rank == 0:
            from mpi4py import MPI
            wrong = sum(r["wrong"] for r in rows)
            busbw = [r["busbw_GBps"] for r in rows if r["bytes"] >= (1 << 20)]
            print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
            if busbw:
                print(f"# Avg bus bandwidth (>= 1 MiB) : {statistics.fmean(busbw):.4f} GB/s")
            if args.json:
                doc = {"benchmark": "allreduce", "ranks": world.size, "dtype": dtype.name,
                       "iters": args.iters, "warmup": args.warmup,
                       "mpi": MPI.Get_library_version().splitlines()[0].strip(),
                       "host": os.uname().nodename, "cpus": os.cpu_count(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows}
                checkpoint.write_text(Path(args.json), json.dumps(doc, indent=1) + "\n")
            return 0 if wrong == 0 else 1
        return 0


def run_allreduce_sweep(comm, algos, dtype, counts, iters, warmup, deadline_s=60.0,
                        max_seconds=0.0, print_row=None, header=False,
                        checksum: str = "crc32c", oversubscribed: bool = False) -> list[dict]:
    """Collective: time every (algorithm, count) pair on ``comm``; rows (same on every rank).

    ``checksum``: "crc32c" or "none" for the own algorithms' messages, or "both" (each own
    algorithm twice; rows carry ``checksum``).  ``oversubscribed``: more ranks than cores
    on the node (shorter spins while waiting, see ``transport.spin_budget``)."""
    from mpi4py import MPI
    from ..comm.allreduce import make_allreducer
    from ..comm.transport import Transport
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    if header:
        print(f"# mpitrain bench allreduce: {size} ranks, dtype {dtype.name}, "
              f"{iters} iters (+{warmup} warm-up), in-place SUM")
        print(f"# {'size(B)':>12} {'count':>10} {'type':>8} {'algorithm':>18} "
              f"{'time(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>7} "
              f"{'redtime(us)':>11}", flush=True)
    sums = ["crc32c", "none"] if checksum == "both" else [checksum]
    runs = [(a, "-" if a == "native" else c) for a in algos for c in (["-"] if a == "native" else sums)]
    for algo, csum in runs:
        transport = None if algo == "native" else Transport(comm, delivery="strict",
                                                            deadline_s=deadline_s,
                                                            checksum=csum != "none",
                                                            oversubscribed=oversubscribed)
        ar = make_allreducer(algo, comm, transport, oversubscribed=oversubscribed)
        for li, count in enumerate(counts):
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
            # local reduction cost (gamma): np.add of two buffers of this size
            other = src.copy()
            red = []
            for _ in range(min(5, max(1, len(times)))):
                t0 = time.perf_counter()
                np.add(buf, other, out=buf)
                red.append(time.perf_counter() - t0)
            t = comm.allreduce(med, op=MPI.MAX)
            tmin = comm.allreduce(min(times), op=MPI.MAX)
            wrong = comm.allreduce(worst, op=MPI.SUM)
            redt = comm.allreduce(statistics.median(red), op=MPI.MAX)
            nbytes = count * dtype.itemsize
            algbw = nbytes / t / 1e9
            row = {"algorithm": algo, "checksum": csum, "bytes": nbytes, "count": count,
                   "dtype": dtype.name,
                   "ranks": size, "time_s": t, "time_us": t * 1e6, "min_time_s": tmin,
                   "iters": len(times), "algbw_GBps": algbw,
                   "busbw_GBps": algbw * 2 * (size - 1) / size, "wrong": wrong,
                   "reduce_s": redt}
            rows.append(row)
            if print_row:
                print_row(row)
        if transport is not None:
            transport.close()
        comm.Barrier()
    return rows


def _print_row(r: dict) -> None:
    label = r["algorithm"] + (":nosum" if r.get("checksum") == "none" else "")
    print(f"  {r['bytes']:>12} {r['count']:>10} {r['dtype']:>8} {label:>18} "
          f"{r['time_us']:>10.1f} {r['algbw_GBps']:>11.4f} {r['busbw_GBps']:>11.4f} "
          f"{r['wrong']:>7} {r['reduce_s'] * 1e6:>11.1f}", flush=True)


def main_allreduce(argv: list[str]) -> int:
    """``mpitrain bench allreduce ARGS`` (run under mpiexec, or with ``-n P``)."""
    return _entry("allreduce", argv, _AllreduceBench())


# --------------------------------------------------------------------------- train
def train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpitrain bench train",
                description="steps/s, samples/s and the compute / communication split of a job")
    p.add_argument("job", nargs="?", help="job file (TOML); omit for the built-in digits job")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a job key; repeatable")
    p.add_argument("--steps", type=int, default=50, help="measured steps per run (50)")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring (5)")
    p.add_argument("--compare-overlap", action="store_true",
                   help="run with sync.overlap on and off (interleaved) and compare")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per variant, interleaved (1; medians pool all runs)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def summarize_steps(records: list[dict], warmup: int) -> dict:
    """Medians of the per-step records after ``warmup`` steps."""
    steps = [r for r in records if r.get("kind", "step") == "step" and r["step"] > warmup]
    if not steps:
        raise MpitrainError("no step records after the warm-up: use more --steps")

    def med(k):
        return statistics.median(r[k] for r in steps)

    total = med("time_total")
    samples = statistics.median(r["samples"] for r in steps)
    return {"steps": len(steps), "time_compute_s": med("time_compute"),
            "time_comm_s": med("time_comm"), "time_wait_s": med("time_wait"),
            "time_total_s": total,
            "steps_per_s": 1.0 / total, "samples_per_s": samples / total,
            "samples_per_step": samples,
            "mean_time_total_s": statistics.fmean(r["time_total"] for r in steps)}


class _TrainBench:
    def prepare(self, argv):
        from .. import config
        from ..context import environment
        args = train_parser().parse_args(argv)
        if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
            raise ConfigError("--steps and --repeat must be >= 1, --warmup >= 0")
        user_out = any(o.strip().startswith("run.out") for o in args.overrides)
        base = config.load(args.job, args.overrides, environment())  # validate early
        variants = [("overlap_on", True), ("overlap_off", False)] if args.compare_overlap \
            else [("run", base.sync.overlap)]
        return args, user_out, variants

    def run(self, world, env, prepared):
        from .. import config, train
        from ..metrics import read_jsonl
        args, user_out, variants = prepared
        tmp = world.comm.bcast(tempfile.mkdtemp(prefix="mpitrain-bench-") if world.rank == 0
                               else None, root=0)
        results: dict[str, list[dict]] = {name: [] for name, _ in variants}
        per_run: dict[str, list[dict]] = {name: [] for name, _ in variants}
        try:
            for rep in range(args.repeat):
                for name, overlap in variants:
                    sets = list(args.overrides)
                    if not user_out:
                        sets.append(f"run.out={json.dumps(f'{tmp}/{name}-{rep}')}")
                    sets += ["run.progress=\"off\"", f"run.steps={args.steps + args.warmup}",
                             f"sync.overlap={'true' if overlap else 'false'}"]
                    with world.collective_errors():
                        cfg = config.load(args.job, sets, env)
                        if user_out and (len(variants) > 1 or args.repeat > 1):
                            cfg = config.load(args.job, sets + [
                                f"run.out={json.dumps(str(cfg.out_dir()) + f'/{name}-{rep}')}"],
                                env)
                        from .. import context
                        ctx = context.RankContext.create(world, cfg, env)
                        prepared_run = train.setup(ctx, cfg)
                    ctx.connect(world)
                    summary = train.run(ctx, cfg, prepared_run)
                    ctx.close()
                    if world.rank == 0:
                        recs = read_jsonl(Path(summary["out"]) / "metrics.jsonl")
                        recs = [r for r in recs if r.get("kind") == "step"]
                        results[name] += [r for r in recs if r["step"] > args.warmup]
                        per_run[name].append(summarize_steps(recs, args.warmup))
                        per_run[name][-1]["out"] = summary["out"]
            if world.rank != 0:
                return 0
            report = {"benchmark": "train", "job": args.job, "overrides": args.overrides,
                      "ranks": world.size, "steps": args.steps, "warmup": args.warmup,
                      "repeat": args.repeat, "variants": {}}
            for name, _ in variants:
                s = summarize_steps(results[name], 0)
                s["runs"] = per_run[name]
                report["variants"][name] = s
            if args.compare_overlap:
                on, off = report["variants"]["overlap_on"], report["variants"]["overlap_off"]
                # Time in a communication call is on the critical path as much as time
                # blocked in one: this rank computes nothing meanwhile.  With overlap off
                # all communication happens in finish (comm is 0 unless checks run).
                comm_time = off["time_comm_s"] + off["time_wait_s"]
                exposed = on["time_comm_s"] + on["time_wait_s"]
                report["communication_s"] = comm_time
                report["exposed_fraction"] = exposed / comm_time if comm_time > 0 else float("nan")
                report["blocked_fraction"] = (on["time_wait_s"] / off["time_wait_s"]
                                              if off["time_wait_s"] > 0 else float("nan"))
                report["speedup_from_overlap"] = off["time_total_s"] / on["time_total_s"]
            _print_train(report)
            if args.json:
                checkpoint.write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
            return 0
        finally:
            if world.rank == 0 and not user_out:
                shutil.rmtree(tmp, ignore_errors=True)


def _print_train(rep: dict) -> None:
    print(f"# mpitrain bench train: {rep['job'] or 'built-in digits job'} "
          f"{' '.join('--set ' + o for o in rep['overrides'])}".rstrip())
    print(f"# {rep['ranks']} ranks, {rep['steps']} measured steps after {rep['warmup']} warm-up, "
          f"x{rep['repeat']} runs; medians per step (rank 0)")
    print(f"# {'variant':>12} {'steps/s':>9} {'samples/s':>10} {'compute(ms)':>11} "
          f"{'comm(ms)':>9} {'wait(ms)':>9} {'total(ms)':>10} {'wait/total':>10}")
    for name, v in rep["variants"].items():
        print(f"  {name:>12} {v['steps_per_s']:>9.2f} {v['samples_per_s']:>10.0f} "
              f"{v['time_compute_s'] * 1e3:>11.3f} {v['time_comm_s'] * 1e3:>9.3f} "
              f"{v['time_wait_s'] * 1e3:>9.3f} {v['time_total_s'] * 1e3:>10.3f} "
              f"{v['time_wait_s'] / v['time_total_s']:>10.3f}")
    print("# compute + comm + wait = total, each a median: comm is time inside communication "
          "calls during the step (starting and advancing the reductions while backward runs, "
          "end-to-end checks), wait the time blocked after backward")
    if "exposed_fraction" in rep:
        print(f"# communication time (comm + wait with overlap off): "
              f"{rep['communication_s'] * 1e3:.3f} ms; left on the critical path with overlap "
              f"on (comm + wait): {rep['exposed_fraction'] * 100:.1f}%; blocked after "
              f"backward alone (wait on / wait off): {rep['blocked_fraction'] * 100:.1f}%; "
              f"overlap speed-up x{rep['speedup_from_overlap']:.3f}")
    sys.stdout.flush()


def main_train(argv: list[str]) -> int:
    """``mpitrain bench train JOB [--set k=v ...] [--steps N] [--warmup W] [--compare-overlap]``."""
    return _entry("train", argv, _TrainBench())


def main(argv: list[str]) -> int:
    """``mpitrain bench {allreduce,train} ARGS``."""
    if not argv or argv[0] not in ("allreduce", "train"):
        usage = ("usage: mpitrain bench {allreduce,train} [-n P] [ARGS]\n"
                 "  allreduce  nccl-tests style sweep: time, algbw, busbw, #wrong per size and "
                 "algorithm\n  train      steps/s, samples/s, compute/communication per step of "
                 "a job\n`mpitrain bench allreduce --help` / `mpitrain bench train --help` for "
                 "the options")
        helped = bool(argv) and argv[0] in ("-h", "--help")
        print(usage, file=sys.stdout if helped else sys.stderr)
        return 0 if helped else 2
    return (main_allreduce if argv[0] == "allreduce" else main_train)(argv[1:])
