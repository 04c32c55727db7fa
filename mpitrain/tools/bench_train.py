"""``mpitrain bench train``: steps/s, samples/s and the compute / communication split of a job.

Runs a job through ``train.setup``/``train.run`` (progress off, output in a temporary folder
unless ``run.out`` is set) and reads its ``metrics.jsonl``: medians after warm-up of
compute, communication wait and total per step, steps/s and samples/s.  With
``--compare-overlap`` it runs the job with overlap on and off, interleaved ``--repeat``
times, and reports the communication left on the critical path: wait(on) / wait(off).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from .. import checkpoint, config, context, jobs
from ..context import World
from ..errors import ConfigError, MpitrainError
from ..metrics import read_jsonl
from . import progress
from .rank_argparse import RankArgumentParser


def parser() -> argparse.ArgumentParser:
    p = RankArgumentParser(prog="mpitrain bench train",
                           description="steps/s, samples/s and the compute / communication "
                                       "split of a job")
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
    progress.add_option(p)
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


# --------------------------------------------------------------------------- the command
def prepare(argv: list[str], env: dict[str, str]) -> tuple:
    """Parse the options and load the job once to check it (local: may fail on any rank)."""
    args = parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        raise ConfigError("--steps and --repeat must be >= 1, --warmup >= 0")
    user_out = any(o.strip().startswith("run.out") for o in args.overrides)
    job_file = jobs.resolve(args.job)
    base = config.load(job_file, args.overrides, env)  # validate early
    variants = [("overlap_on", True), ("overlap_off", False)] if args.compare_overlap \
        else [("run", base.sync.overlap)]
    return args, job_file, user_out, variants


def run(world: World, prepared: tuple) -> int:
    """Collective: run the variants, interleaved; rank 0 prints the table (and --json)."""
    args, job_file, user_out, variants = prepared
    tmp = world.comm.bcast(tempfile.mkdtemp(prefix="mpitrain-bench-") if world.rank == 0
                           else None, root=0)
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    per_run: dict[str, list[dict]] = {name: [] for name, _ in variants}
    bar = progress.Progress(args.progress, args.repeat * len(variants),
                            active=world.rank == 0, desc="bench train runs")
    try:
        for rep in range(args.repeat):
            for name, overlap in variants:
                out = _run_once(world, args, job_file, user_out, len(variants), tmp, name,
                                overlap, rep)
                bar.advance(1)
                if world.rank == 0:
                    recs = read_jsonl(Path(out) / "metrics.jsonl")
                    recs = [r for r in recs if r.get("kind") == "step"]
                    results[name] += [r for r in recs if r["step"] > args.warmup]
                    per_run[name].append(summarize_steps(recs, args.warmup))
                    per_run[name][-1]["out"] = out
        bar.close()
        if world.rank != 0:
            return 0
        report = _report(args, world.size, variants, results, per_run)
        _print_train(report)
        if args.json:
            checkpoint.write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
        return 0
    finally:
        bar.close()
        if world.rank == 0 and not user_out:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_once(world: World, args, job_file, user_out: bool, n_variants: int, tmp: str,
              name: str, overlap: bool, rep: int) -> str:
    """Collective: one training run of the job (a variant's ``rep``-th); its output folder."""
    from .. import train  # starts MPI: not at import, `bench -n P` must not in the launcher
    sets = list(args.overrides)
    if not user_out:
        sets.append(f"run.out={json.dumps(f'{tmp}/{name}-{rep}')}")
    sets += ["run.progress=\"off\"", f"run.steps={args.steps + args.warmup}",
             f"sync.overlap={'true' if overlap else 'false'}"]
    env = world.env
    with world.collective_errors():
        cfg = config.load(job_file, sets, env)
        if user_out and (n_variants > 1 or args.repeat > 1):
            cfg = config.load(job_file, sets + [
                f"run.out={json.dumps(str(cfg.out_dir()) + f'/{name}-{rep}')}"], env)
        ctx = context.RankContext.create(world, cfg, env)
        # a benchmark's output is scratch: a repeated bench replaces the last one's
        mode = train.StartMode(overwrite=True)
        prepared_run = train.setup(ctx, cfg, mode)
    ctx.connect(world)
    summary = train.run(ctx, cfg, prepared_run, mode)
    ctx.close()
    return summary["out"]


def _report(args, ranks: int, variants: list, results: dict, per_run: dict) -> dict:
    """The JSON report: per variant the medians over all runs, and the overlap comparison."""
    report = {"benchmark": "train", "job": args.job, "overrides": args.overrides,
              "ranks": ranks, "steps": args.steps, "warmup": args.warmup,
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
    return report


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
