"""Command line: ``mpitrain run | explain | diagnose | bench | simulate``; top-level errors.

A user error (:class:`MpitrainError`) becomes one message on stderr, printed by one rank,
and a non-zero exit on every rank -- never a traceback per rank, never a hang:

* errors every rank raised together (bad config, replica checks, preemption, a fault that
  the transport reported to all ranks) exit each process with the error's code;
* an error only one rank saw (a NaN loss on that rank's shard, say) aborts the whole job
  with MPI_Abort, since the other ranks may already wait in a collective for it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from .errors import ConfigError, LaunchError, MpitrainError

EXIT_WAIT_S = 3.0  # how long ranks that failed together wait for each other before exiting
OPENMPI_LOCAL_ENV = {  # what a local Open MPI launch as root, on a small machine, needs
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpitrain", description="MPI data-parallel training with fault injection in the "
                                     "gradient message path.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train a job (under mpiexec/srun, or -n P to launch)",
                         description="Train JOB (a TOML job file; default: the built-in digits "
                                     "job). Launch with `mpiexec -n P mpitrain run JOB`, under "
                                     "srun, or with `mpitrain run -n P JOB`.")
    run.add_argument("job", nargs="?", help="job file (TOML); omit for the built-in digits job")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override a job key (TOML value syntax; "
                     "bare words are strings), e.g. --set optim.lr=0.01; repeatable")
    run.add_argument("--fault", dest="faults", action="append", default=[], metavar="RULE",
                     help="add a fault rule, e.g. --fault 'kind=drop,step=3,layer=1'; repeatable")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in the output folder "
                          "(starts fresh when there is none)")
    run.add_argument("-n", "--np", dest="nprocs", type=int, metavar="P",
                     help="start P ranks with the mpiexec that belongs to mpi4py")
    run.set_defaults(func=cmd_run)

    explain = sub.add_parser("explain", help="the chapter's worked example, step by step")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--scenario", nargs="?", const=True, default=False, metavar="JOB",
                         help="one step of the chapter's two-GPU scenario (default job: "
                              "jobs/chapter/two_gpus.toml)")
    explain.set_defaults(func=cmd_explain)

    diagnose = sub.add_parser("diagnose", help="line up the ranks' collective ledgers of a run")
    diagnose.add_argument("run_dir", help="the run's output folder")
    diagnose.set_defaults(func=cmd_diagnose)

    # The rest of the line goes to the benchmark tools unparsed (they have their own --help).
    bench = sub.add_parser("bench", help="benchmarks: `bench allreduce` (nccl-tests style sweep), "
                           "`bench train` (steps/s, compute/communication split)",
                           add_help=False, prefix_chars="\0")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    simulate = sub.add_parser("simulate", help="alpha-beta-gamma cost model of a training step "
                              "at any scale", add_help=False, prefix_chars="\0")
    simulate.add_argument("simulate_args", nargs=argparse.REMAINDER)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except MpitrainError as err:  # raised before MPI started, or by a single process
        print(f"mpitrain: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # mpiexec forwards Ctrl-C to every rank: say it once
        from .context import launcher_rank
        if not launcher_rank():
            print("mpitrain: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- run
def cmd_run(args) -> int:
    if args.nprocs is not None:
        return launch(args)
    from . import config, context
    # Launched with -disable-auto-cleanup, hydra sends SIGUSR1 to the other ranks whenever a
    # rank exits, also at a normal end.  Training turns SIGUSR1 into "checkpoint and stop"
    # (preemption); outside training it must not kill the process.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    env = context.environment()
    world = context.World(env)
    try:
        with world.collective_errors():
            world.check_launcher()
            rules = [parse_fault(text) for text in args.faults]
            cfg = config.load(args.job, args.overrides, env, extra_rules=rules)
            ctx = context.RankContext.create(world, cfg, env)
            from . import train
            prepared = train.setup(ctx, cfg)
        # From here on, every collective is matched on all ranks: a rank that fails alone
        # aborts the job (see _exit_on_error) instead of leaving the others waiting.
        ctx.connect(world)
        summary = train.run(ctx, cfg, prepared, resume=args.resume)
    except MpitrainError as err:
        _exit_on_error(err, world)
    except Exception:  # a bug: show where, and take the job down rather than hang it
        traceback.print_exc()
        sys.stderr.flush()
        world.release_shared_memory()
        world.comm.Abort(1)
    if world.rank == 0:
        _print_summary(summary)
    ctx.close()
    return 0


def _exit_on_error(err: MpitrainError, world) -> None:
    """Print ``err`` once and end this rank -- and the job -- with its exit code."""
    everywhere = err.reporter is not None
    if not everywhere or err.reporter == world.rank:
        print(f"mpitrain: error: {err}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    world.release_shared_memory()  # no MPI_Finalize on this path: it would not clean up
    if world.size > 1 and not everywhere:
        world.comm.Abort(err.exit_code)
    if world.size > 1:
        # Leave together: the launcher kills the remaining ranks as soon as one exits with
        # an error ("BAD TERMINATION"), so the ranks meet first (boundedly: one may be
        # dead) and then all exit at once.  No MPI_Finalize: it could wait for a dead rank.
        world.all_present(timeout=EXIT_WAIT_S)
    os._exit(err.exit_code)


def _print_summary(summary: dict) -> None:
    parts = [f"{summary['steps']} steps"]
    for key in ("loss", "val_loss", "val_accuracy"):
        if summary.get(key) is not None:
            parts.append(f"{key} {summary[key]:.4f}")
    print(f"mpitrain: done: {', '.join(parts)}; outputs in {summary['out']}", file=sys.stderr)


def parse_fault(text: str) -> dict:
    """A fault rule from the command line: 'kind=drop,step=3' or TOML 'kind="drop", step=3'."""
    from .config import _parse_value
    import tomllib
    try:
        return tomllib.loads(f"r = {{{text}}}")["r"]
    except tomllib.TOMLDecodeError:
        pass
    rule = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ConfigError(f"--fault {text}: expected key=value pairs separated by commas, "
                              f"e.g. --fault 'kind=drop,step=3,layer=1'")
        rule[k.strip()] = _parse_value(v)
    return rule


def launch(args) -> int:
    """Re-run this command under ``mpiexec -n P`` from mpi4py's own MPI installation."""
    from . import config, context
    overrides = list(args.overrides)
    # Check the job before starting any rank, and keep the progress bar: under mpiexec the
    # ranks write into pipes, so they cannot see that the user is at a terminal.
    cfg = config.load(args.job, overrides, context.environment(),
                      extra_rules=[parse_fault(f) for f in args.faults])
    if cfg.run.progress == "auto" and sys.stderr.isatty():
        overrides.append('run.progress="bar"')
    argv = ["-m", "mpitrain", "run", *([args.job] if args.job else [])]
    for o in overrides:
        argv += ["--set", o]
    for f in args.faults:
        argv += ["--fault", f]
    argv += ["--resume"] if args.resume else []
    # Keep the other ranks alive when one dies, so they can say which one did (hydra's
    # default kills them all at once, silently).  A rank that fails alone still takes the
    # job down with MPI_Abort.
    exec_under_mpiexec(args.nprocs, argv, keep_survivors=True)
    return 0  # not reached


def exec_under_mpiexec(nprocs: int, python_args: list[str], keep_survivors: bool = False):
    """Replace this process with ``mpiexec -n NPROCS python PYTHON_ARGS``.

    Uses the mpiexec that belongs to mpi4py's MPI (another MPI's launcher silently starts
    NPROCS separate rank-0 jobs), with what a local run needs: one BLAS thread per rank, and
    for Open MPI the settings for root and oversubscription.  ``keep_survivors`` passes
    MPICH's -disable-auto-cleanup (the ranks must then ignore SIGUSR1 outside training).
    """
    if nprocs < 1:
        raise ConfigError(f"-n {nprocs}: the number of ranks must be >= 1")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        raise LaunchError(f"no mpiexec next to {sys.executable}",
                          hint="install MPI from PyPI into this environment (pip install mpich), "
                               "or launch with your cluster's mpiexec/srun yourself")
    import mpi4py
    mpi4py.rc.initialize = False  # only ask which library; do not start MPI in the launcher
    from mpi4py import MPI
    library = MPI.Get_library_version()
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if "Open MPI" in library:
        for k, v in OPENMPI_LOCAL_ENV.items():
            env.setdefault(k, v)
    argv = [str(mpiexec), "-n", str(nprocs)]
    if keep_survivors and "MPICH" in library:
        argv.append("-disable-auto-cleanup")
    argv += [sys.executable, *python_args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


# --------------------------------------------------------------------------- other commands
def cmd_explain(args) -> int:
    from .tools.explain import main as explain_main
    return explain_main(json_output=args.json, scenario=args.scenario)


def cmd_diagnose(args) -> int:
    from .tools.diagnose import diagnose
    report, code = diagnose(Path(args.run_dir))
    print(report)
    return code


def cmd_bench(args) -> int:
    from .tools import bench
    return bench.main(args.bench_args)


def cmd_simulate(args) -> int:
    from .tools.simulate import main as simulate_main
    return simulate_main(args.simulate_args)
