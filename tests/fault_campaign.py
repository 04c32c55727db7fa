"""A randomized fault campaign: random legal fault plans against the fault-free run.

    python tests/fault_campaign.py --plans 500 --seed 1 [--workers 1] [--out DIR]

Each plan is drawn from a seed: 2-4 ranks, an own allreduce algorithm, a delivery mode, and
one to three rules of any kind that can act in that mode (message faults anywhere, delays of
any length -- longer than the deadline too -- stragglers, and crashes in strict mode).  Every
plan runs as a real MPI job under a timeout, and is judged by what the harness promises:

* reliable: the job succeeds and its parameters are bitwise those of the fault-free run;
* strict: the job succeeds with the fault-free parameters (the fault cost only time), or it
  exits 3 with one message that names the injected fault;
* lossy: the job succeeds or exits 3; when its parameters differ from the fault-free run's,
  the run's summary says so (no silent hit);
* always: no hang, no message printed twice, no internal placeholder in a message
  ("layer -1", "fence fence"), no traceback, no process left behind.

The suite runs a few dozen plans (tests/test_fault_campaign.py); this script runs as many as
asked and prints each failure with the command that replays it.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STEPS, LAYERS = 6, [32, 16, 10]
BASE = ["--set", f"run.steps={STEPS}", "--set", f"model.layers={LAYERS}",
        "--set", "data.batch_size=16", "--set", "data.val_fraction=0.0",
        "--set", "faults.deadline_ms=1000", "--set", 'run.progress="off"',
        "--set", "sync.check_every=2"]
PHASES = {"ring": ("reduce_scatter", "allgather"), "recursive_doubling": ("exchange",),
          "tree": ("reduce", "broadcast")}
PLACEHOLDERS = ("layer -1", "fence fence")


@dataclass
class Plan:
    """One drawn job: ranks, algorithm, delivery and fault rules (as --fault options)."""

    seed: int
    ranks: int
    algorithm: str
    delivery: str
    rules: list[dict] = field(default_factory=list)

    def args(self, out: Path) -> list[str]:
        args = [*BASE, "--set", f'sync.algorithm="{self.algorithm}"',
                "--set", f'faults.delivery="{self.delivery}"', "--set", f"faults.seed={self.seed}",
                "--set", f'run.out="{out}"']
        for rule in self.rules:
            args += ["--fault", ",".join(f"{k}={_value(v)}" for k, v in rule.items())]
        return args


def _value(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


def draw(seed: int) -> Plan:
    """The plan of ``seed``: every rule legal for its job (the harness refuses the others)."""
    rng = random.Random(seed)
    plan = Plan(seed, rng.choice((2, 3, 4)), rng.choice(tuple(PHASES)),
                rng.choice(("strict", "lossy", "reliable")))
    kinds = ["drop", "delay", "corrupt", "duplicate", "reorder", "slow"]
    if plan.delivery == "strict":
        kinds.append("crash")
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(kinds)
        rule: dict = {"kind": kind, "step": rng.randint(1, STEPS)}
        if kind in ("crash", "slow"):
            rule["rank"] = rng.randrange(plan.ranks)
            if kind == "slow":
                rule["delay_ms"] = rng.choice((20, 200))
        else:
            if rng.random() < 0.6:
                rule["layer"] = rng.randrange(len(LAYERS))
            if rng.random() < 0.5:
                rule["src"] = rng.randrange(plan.ranks)
            if rng.random() < 0.4:
                rule["phase"] = rng.choice(PHASES[plan.algorithm])
            if rng.random() < 0.5:
                rule["probability"] = rng.choice((0.3, 0.7))
            rule["count"] = rng.choice((1, 2))
            if kind == "delay":
                rule["delay_ms"] = rng.choice((5, 300, 1400, 3000))
            if kind == "corrupt":
                rule["corrupt"] = rng.choice(("bitflip", "nan"))
        plan.rules.append(rule)
    return plan


def launch(args: list[str], ranks: int, timeout: float) -> subprocess.CompletedProcess | None:
    """``mpitrain run -n RANKS ARGS`` under a timeout (None: it hung)."""
    cmd = [PYTHON, "-m", "mpitrain", "run", "-n", str(ranks), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["kill", "-9", f"-{proc.pid}"], check=False)  # the job dies with it
        proc.communicate(timeout=30)
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def params(out: Path) -> dict | None:
    try:
        with np.load(out / "model.npz") as z:
            return {k: z[k] for k in z.files}
    except OSError:
        return None


def same(a: dict | None, b: dict | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() \
        and all(np.array_equal(a[k], b[k]) for k in a)


def judge(plan: Plan, res: subprocess.CompletedProcess | None, got: dict | None,
          want: dict | None) -> str | None:
    """What went wrong with this plan's run, or None."""
    if res is None:
        return "hang (timed out)"
    err = res.stderr
    if "Traceback" in err:
        return "traceback"
    if err.count("mpitrain: error:") > 1:
        return "error printed more than once"
    if any(p in err for p in PLACEHOLDERS):
        return f"internal placeholder in the message: {err.strip()[-300:]}"
    if plan.delivery == "reliable":
        if res.returncode != 0:
            return f"reliable run failed (exit {res.returncode}): {err.strip()[-300:]}"
        return None if same(got, want) else "reliable run differs from the fault-free run"
    if res.returncode == 0:
        if plan.delivery == "strict" and not same(got, want):
            return "strict run succeeded with parameters unlike the fault-free run's"
        if plan.delivery == "lossy" and not same(got, want) and "changed the results" not in err:
            return "lossy run changed the results silently"
        return None
    if res.returncode != 3:
        return f"exit {res.returncode} (expected 0 or 3): {err.strip()[-300:]}"
    if plan.delivery == "strict" and "Injected fault" not in err and "injected" not in err:
        return f"strict failure does not name the injected fault: {err.strip()[-300:]}"
    return None


def run_campaign(seeds: list[int], workdir: Path, timeout: float = 90.0,
                 report=print) -> list[tuple[Plan, str]]:
    """Run the plans of ``seeds``; return the failures (plan, what went wrong)."""
    references: dict[tuple[int, str], dict | None] = {}
    failures = []
    for seed in seeds:
        plan = draw(seed)
        key = (plan.ranks, plan.algorithm)
        if key not in references:
            ref_out = workdir / f"ref-{plan.ranks}-{plan.algorithm}"
            clean = Plan(0, plan.ranks, plan.algorithm, "strict")
            res = launch(clean.args(ref_out), plan.ranks, timeout)
            assert res is not None and res.returncode == 0, (res and res.stderr)
            references[key] = params(ref_out)
        out = workdir / f"plan-{seed}"
        res = launch(plan.args(out), plan.ranks, timeout)
        verdict = judge(plan, res, params(out), references[key])
        report(f"plan {seed}: P={plan.ranks} {plan.algorithm} {plan.delivery} "
               f"{json.dumps(plan.rules)} -> {verdict or 'ok'}")
        if verdict:
            failures.append((plan, verdict))
    return failures


def replay(plan: Plan) -> str:
    """The command line that replays ``plan``."""
    return shlex.join(["mpitrain", "run", "-n", str(plan.ranks),
                       *plan.args(Path(f"runs/plan-{plan.seed}"))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plans", type=int, default=100, help="how many plans (default 100)")
    p.add_argument("--seed", type=int, default=1, help="first plan's seed (default 1)")
    p.add_argument("--out", help="keep the runs in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mpitrain-campaign-") as tmp:
        workdir = Path(args.out or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        failures = run_campaign(list(range(args.seed, args.seed + args.plans)), workdir)
    for plan, verdict in failures:
        print(f"FAILED plan {plan.seed}: {verdict}\n  replay: {replay(plan)}")
    print(f"{args.plans - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
