"""Command line: ``mpitrain run | config | evaluate | explain | diagnose | report | compare |
bench | simulate``.

This module only builds the parser and hands each command to its home: training to
:mod:`mpitrain.train` inside :func:`mpitrain.session.session` (start-up, one message per
error, exit codes), ``-n P`` to :mod:`mpitrain.launch`, the other commands to
:mod:`mpitrain.tools`.  A user error raised before MPI starts, or by a command that runs in
one process, is printed here and becomes the exit status.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, MpitrainError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpitrain", description="MPI data-parallel training with fault injection in the "
                                     "gradient message path.")
    parser.add_argument("--version", action=VersionAction,
                        help="print the versions of mpitrain, mpi4py and its MPI library, "
                             "numpy and Python, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="`mpitrain COMMAND --help` for its options")

    _add_run_parser(sub)

    _add_config_parser(sub)
    _add_evaluate_parser(sub)

    explain = sub.add_parser("explain", help="the chapter's worked example, step by step")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--scenario", nargs="?", const=True, default=False, metavar="JOB",
                         help="one step of the chapter's two-GPU scenario (default job: "
                              "jobs/chapter/two_gpus.toml)")
    explain.set_defaults(func=cmd_explain)

    diagnose = sub.add_parser("diagnose", help="line up the ranks' collective ledgers of a run")
    diagnose.add_argument("run_dir", help="the run's output folder")
    diagnose.set_defaults(func=cmd_diagnose)

    doctor = sub.add_parser("doctor", help="which MPI mpi4py loads, its launcher, ULFM, "
                            "CUDA-aware transfers, shared memory, and what to fix")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)

    _add_report_commands(sub)

    # The rest of the line goes to the benchmark tools unparsed (they have their own --help).
    bench = sub.add_parser("bench", help="benchmarks: `bench allreduce` (nccl-tests style sweep), "
                           "`bench train` (steps/s, compute/communication split)",
                           add_help=False, prefix_chars="\0")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="a benchmark and its options (`mpitrain bench --help`)")
    bench.set_defaults(func=cmd_bench)
    simulate = sub.add_parser("simulate", help="alpha-beta-gamma cost model of a training step "
                              "at any scale", add_help=False, prefix_chars="\0")
    simulate.add_argument("simulate_args", nargs=argparse.REMAINDER,
                          help="the model's options (`mpitrain simulate --help`)")
    simulate.set_defaults(func=cmd_simulate)
    return parser


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """JOB, --set and --fault: how a job is named and changed, the same for every command."""
    parser.add_argument("job", nargs="?", help="job file (TOML) or the name of a built-in job "
                        "(e.g. faults/crash); omit for the built-in digits job")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a job key (TOML value "
                        "syntax; bare words are strings), e.g. --set optim.lr=0.01; repeatable")
    parser.add_argument("--fault", dest="faults", action="append", default=[], metavar="RULE",
                        help="add a fault rule, e.g. --fault 'kind=drop,step=3,layer=1'; "
                             "repeatable")


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="train a job (under mpiexec/srun, or -n P to launch)",
                         description="Train JOB (a TOML job file; default: the built-in digits "
                                     "job). Launch with `mpiexec -n P mpitrain run JOB`, under "
                                     "srun, or with `mpitrain run -n P JOB`.")
    _add_job_arguments(run)
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in the output folder "
                            "(starts fresh when there is none)")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in an output folder that holds an earlier run; the "
                            "earlier run is kept aside until this one writes its first "
                            "checkpoint, and put back if it fails before")
    run.add_argument("--allow-change", dest="allow_changes", action="append", default=[],
                     metavar="KEY", help="with --resume: accept a deliberate change of KEY "
                     "(e.g. optim.lr, or optim.*), recorded in events.jsonl; repeatable")
    run.add_argument("-n", "--np", dest="nprocs", type=int, metavar="P",
                     help="start P ranks with the mpiexec that belongs to mpi4py")
    run.add_argument("--restarts", type=int, default=0, metavar="N",
                     help="with -n: after a rank's death or an unrecovered synchronization "
                          "fault, relaunch from the newest checkpoint, up to N times")
    run.add_argument("--min-ranks", type=int, metavar="M",
                     help="with --restarts: a rank that died is not replaced; relaunch on the "
                          "ranks left, never fewer than M (the run resumes on them)")
    run.add_argument("--srun", metavar="PMI",
                     help="with -n: start the ranks as a step of this Slurm allocation, "
                          "`srun --mpi=PMI -n P`, instead of mpiexec (jobs/slurm/train.sbatch)")
    _add_host_arguments(run)
    run.set_defaults(func=cmd_run, launcher_args=[])


def _add_host_arguments(parser: argparse.ArgumentParser) -> None:
    """``--hosts`` / ``--hostfile`` of a command with ``-n P`` (see launch.launch_options)."""
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", metavar="HOST[:SLOTS],...",
                       help="with -n: run the ranks on these hosts (e.g. node1,node2 or "
                            "node1:2,node2:2); arguments after `--` go to mpiexec as they are")
    hosts.add_argument("--hostfile", metavar="FILE",
                       help="with -n: run the ranks on the hosts listed in FILE (mpiexec's "
                            "host file format)")


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    cfg = sub.add_parser("config", help="print the resolved job, with where each value came "
                                        "from",
                         description="Print JOB as `mpitrain run` would resolve it (defaults < "
                                     "job file < MPITRAIN_* environment < --set), as the "
                                     "config.toml a run writes with each value's source as "
                                     "a comment.")
    _add_job_arguments(cfg)
    cfg.add_argument("--json", action="store_true",
                     help='{section: {key: {"value": ..., "source": ...}}} instead of TOML')
    cfg.set_defaults(func=cmd_config)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    from .tools.evaluate import SPLITS
    ev = sub.add_parser("evaluate", help="loss, accuracy and confusion matrix of a trained "
                                         "model on a data set (any rank count)",
                        description="Evaluate the parameters of a run folder (model.npz, else "
                                    "its newest checkpoint; model and data from its "
                                    "config.toml) or of a parameter .npz (model and data from "
                                    "--data / --set, else the built-in digits job).  Launch "
                                    "like run: mpiexec, srun, one process, or -n P.")
    ev.add_argument("target", metavar="TARGET", help="a run's output folder, or a parameter "
                    ".npz")
    ev.add_argument("--data", metavar="JOB_OR_NPZ",
                    help="the data set: an .npz with x and y (or a folder of x.npy, y.npy), "
                         "or a job whose [data] is used (with a parameter .npz: its model too)")
    ev.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="override a job key of the model or "
                    "data, e.g. --set run.device=cpu; repeatable")
    ev.add_argument("--split", choices=SPLITS,
                    help="which samples ([data] val_fraction and seed split them as in "
                         "training); default: val for a run folder on its own data, else all")
    ev.add_argument("-n", "--np", dest="nprocs", type=int, metavar="P",
                    help="start P ranks with the mpiexec that belongs to mpi4py")
    _add_host_arguments(ev)
    ev.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ev.set_defaults(func=cmd_evaluate)


class VersionAction(argparse.Action):
    """``--version``: the versions are looked up only when asked (mpi4py loads its MPI)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .version import report
        print(report())
        parser.exit()


def _add_report_commands(sub: argparse._SubParsersAction) -> None:
    """``report`` and ``compare``: pictures of finished (or failed) runs."""
    report = sub.add_parser("report", help="write RUN_DIR/report.html: the run's curves, time "
                            "split, traffic and faults, in figures",
                            description="Write one self-contained page, RUN_DIR/report.html "
                                        "(no network needed to view it), and print a summary.")
    report.add_argument("run_dir", help="the run's output folder")
    report.add_argument("--open", action="store_true", help="open the page in a web browser")
    report.set_defaults(func=cmd_report)
    compare = sub.add_parser("compare", help="overlay the curves of two or more runs, with a "
                             "side-by-side table (compare.html)",
                             description="Overlay the runs' curves and tabulate them side by "
                                         "side: a self-contained page and a table on the "
                                         "terminal.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                         help="two or more run output folders")
    compare.add_argument("--out", default="compare.html", metavar="FILE",
                         help="the page to write (default: compare.html in the current folder)")
    compare.set_defaults(func=cmd_compare)


def main(argv: list[str] | None = None) -> int:
    # mpi4py warns when it sees another MPI's launcher variables; context.start_mpi says
    # the same in one message with what to do, printed once, before MPI start-up aborts.
    warnings.filterwarnings("ignore", message="suspicious MPI execution environment")
    from .context import defer_mpi_start
    defer_mpi_start()
    argv, launcher_args = _split_launcher_args(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    args.launcher_args = launcher_args
    try:
        return args.func(args) or 0
    except MpitrainError as err:  # raised before MPI started, or by a single process
        from .context import launcher_rank
        if not launcher_rank():  # under a launcher, every process raised it: say it once
            print(f"mpitrain: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # mpiexec forwards Ctrl-C to every rank: say it once
        from .context import launcher_rank
        if not launcher_rank():
            print("mpitrain: interrupted", file=sys.stderr)
        return 130


def _split_launcher_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``mpitrain run|evaluate ... -- ARGS``: (the line before ``--``, ARGS for mpiexec).
    bench and simulate hand the rest of their line to their own parsers."""
    if argv[:1] in (["run"], ["evaluate"]) and "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


# --------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    """``mpitrain run``: on every rank, set up and train the job; 0 after a normal end (the
    error exits are the session's).  With ``-n P``: become ``mpiexec -n P mpitrain run``."""
    from .launch import launch_options
    options = launch_options(args.nprocs, args.hosts, args.hostfile, args.launcher_args, "run")
    if args.nprocs is not None:
        from .restarts import launch_run
        flags = (["--resume"] * args.resume + ["--overwrite"] * args.overwrite
                 + [f for key in args.allow_changes for f in ("--allow-change", key)])
        launch_run(args.nprocs, args.job, args.overrides, args.faults, flags,
                   args.restarts, args.min_ranks, options, args.srun)  # no return
    if args.srun is not None:
        raise ConfigError(f"--srun {args.srun} needs -n P: the ranks it starts",
                          hint="use `mpitrain run -n P --srun PMI JOB` in a Slurm batch script")
    if args.restarts or args.min_ranks is not None:
        flag = f"--restarts {args.restarts}" if args.restarts else f"--min-ranks {args.min_ranks}"
        raise ConfigError(f"{flag} needs -n P: mpitrain relaunches only "
                          f"the jobs it launched itself",
                          hint="use `mpitrain run -n P JOB --restarts N`, or your scheduler's "
                               "requeue (see jobs/slurm/train.sbatch)")
    from .mpi_profiles import import_mpi
    import_mpi()  # no MPI library: one message, before the modules that need it load
    from . import config, context, jobs, train
    from .session import session
    with session() as world:
        with world.collective_errors():
            rules = [config.parse_fault(text) for text in args.faults]
            cfg = config.load(jobs.resolve(args.job), args.overrides, world.env,
                              extra_rules=rules)
            ctx = context.RankContext.create(world, cfg, world.env)
            mode = train.StartMode(args.resume, args.overwrite, tuple(args.allow_changes))
            prepared = train.setup(ctx, cfg, mode)
        # From here on, every collective is matched on all ranks: a rank that fails alone
        # aborts the job (see mpitrain.session) instead of leaving the others waiting.
        ctx.connect(world)
        summary = train.run(ctx, cfg, prepared, mode)
        if ctx.is_root:  # after a shrink (recovery.py), world rank 0 may be gone
            _print_summary(summary)
        ctx.close()
    return 0


def _print_summary(summary: dict) -> None:
    from .metrics import fmt
    parts = [f"{summary['steps']} steps"]
    for key in ("loss", "val_loss", "val_accuracy"):
        if summary.get(key) is not None:
            parts.append(f"{key} {fmt(summary[key])}")
    print(f"mpitrain: done: {', '.join(parts)}; outputs in {summary['out']}", file=sys.stderr)


# --------------------------------------------------------------------------- other commands
def cmd_config(args: argparse.Namespace) -> int:
    from .context import environment
    from .tools import config_cmd
    return config_cmd.main(args.job, args.overrides, args.faults, args.json, environment())


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .tools import evaluate
    return evaluate.main(args)


def cmd_explain(args: argparse.Namespace) -> int:
    from .tools.explain import main as explain_main
    return explain_main(json_output=args.json, scenario=args.scenario)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .tools.diagnose import diagnose
    report, code = diagnose(Path(args.run_dir))
    print(report)
    return code


def cmd_doctor(args: argparse.Namespace) -> int:
    from .tools.doctor import main as doctor_main
    return doctor_main(json_output=args.json)


def cmd_report(args: argparse.Namespace) -> int:
    from .tools.report import main as report_main
    return report_main(args.run_dir, open_browser=args.open)


def cmd_compare(args: argparse.Namespace) -> int:
    from .tools.compare import main as compare_main
    return compare_main(args.run_dirs, args.out)


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools import bench
    return bench.main(args.bench_args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .tools.simulate import main as simulate_main
    return simulate_main(args.simulate_args)
