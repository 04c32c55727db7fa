"""``mpitrain bench {allreduce,train} [-n P [--hosts H | --hostfile F]] ARGS [-- MPIEXEC_ARGS]``:
pick the benchmark, launch, run.

``bench allreduce`` (:mod:`.bench_allreduce`) is an nccl-tests style sweep of the allreduce
algorithms; ``bench train`` (:mod:`.bench_train`) times the steps of a job.  Both run under
``mpiexec`` (one process per rank) or re-launch themselves with ``-n P``, and run inside
:func:`mpitrain.session.session` like ``mpitrain run``: the MPI communicator comes from
:mod:`mpitrain.context`, a user error is printed once and becomes the exit status.
"""
from __future__ import annotations

import sys

from ..errors import ConfigError
from ..launch import exec_under_mpiexec, launch_options
from ..session import session
from . import bench_allreduce, bench_train, progress

BENCHMARKS = {"allreduce": bench_allreduce, "train": bench_train}
USAGE = ("usage: mpitrain bench {allreduce,train} [-n P [--hosts H | --hostfile F]] [ARGS] "
         "[-- MPIEXEC_ARGS]\n"
         "  allreduce  nccl-tests style sweep: time, algbw, busbw, #wrong per size and "
         "algorithm\n  train      steps/s, samples/s, compute/communication per step of "
         "a job\n`mpitrain bench allreduce --help` / `mpitrain bench train --help` for "
         "the options")


def main(argv: list[str]) -> int:
    """``mpitrain bench SUB ARGS``: the exit status (1: ``bench allreduce`` found wrong sums).

    Every rank calls it with the same ``argv``; with ``-n P`` it does not return (the
    process becomes ``mpiexec -n P`` running the same command without ``-n``).
    """
    if not argv or argv[0] not in BENCHMARKS:
        helped = bool(argv) and argv[0] in ("-h", "--help")
        print(USAGE, file=sys.stdout if helped else sys.stderr)
        return 0 if helped else 2
    sub, args = argv[0], argv[1:]
    launcher_args: list[str] = []
    if "--" in args:  # the rest goes to mpiexec, as for `mpitrain run -n P ... -- ARGS`
        cut = args.index("--")
        args, launcher_args = args[:cut], args[cut + 1:]
    nprocs, args = strip_np(args)
    hosts, args = strip_option(args, "--hosts")
    hostfile, args = strip_option(args, "--hostfile")
    options = launch_options(nprocs, hosts, hostfile, launcher_args, f"bench {sub}")
    if nprocs is not None:
        exec_under_mpiexec(nprocs, ["-m", "mpitrain", "bench", sub,
                                    *progress.forward_terminal(args)], options=options)
    benchmark = BENCHMARKS[sub]
    with session() as world:
        with world.collective_errors():
            prepared = benchmark.prepare(args, world.env)
        return benchmark.run(world, prepared)


def strip_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Take ``FLAG VALUE`` / ``FLAG=VALUE`` out of ``argv``: (VALUE or None, the rest)."""
    out, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 == len(argv):
                raise ConfigError(f"{flag}: expected a value")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return value, out


def strip_np(argv: list[str]) -> tuple[int | None, list[str]]:
    """Take ``-n P`` / ``--np P`` / ``-nP`` out of ``argv``: (P or None, the rest)."""
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
