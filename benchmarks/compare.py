"""Interleaved comparison: PyTorch DDP vs mpitrain vs a minimal NumPy + mpi4py loop.

For R rounds, for each per-rank batch and rank count, run (a) ddp, (b) mpitrain, (c) minimal,
one after the other, so machine noise (a shared 2-core box) hits all three alike.  Each run
reports the median step period after warm-up (rank 0); the table shows, per configuration,
the median over rounds, the ratios mpitrain/ddp, minimal/ddp, mpitrain/minimal, and the
2-rank scaling efficiency T(1 rank) / T(2 ranks) (per-rank batch fixed: weak scaling).

    python benchmarks/compare.py --rounds 5 --json results/compare.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
IMPLS = ("ddp", "mpitrain", "minimal")
# variants: name -> (script, extra arguments); e.g. mpitrain without the collective ledger
VARIANTS = {"mpitrain_noledger": ("mpitrain", ["--set", "sync.ledger=false"])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(impl: str, ranks: int, batch: int, steps: int, warmup: int, timeout: float = 600,
            extra: list[str] = ()) -> dict:
    base, more = VARIANTS.get(impl, (impl, []))
    script = HERE / f"{base}_loop.py"
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, str(script), "--batch", str(batch),
           "--steps", str(steps), "--warmup", str(warmup), *more, *extra]
    if impl == "ddp":
        cmd.append(f"--port={free_port()}")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    res = json.loads(lines[-1])
    res["impl"] = impl
    return res


def summarize(runs: list[dict]) -> dict:
    table = {}
    for r in runs:
        table.setdefault((r["batch"], r["ranks"], r["impl"]), []).append(r["median_s"])
    med = {k: statistics.median(v) for k, v in table.items()}
    rows = []
    for (batch, ranks, impl), t in sorted(med.items()):
        rows.append({"batch": batch, "ranks": ranks, "impl": impl, "median_step_s": t,
                     "runs": len(table[(batch, ranks, impl)]),
                     "spread_s": [min(table[(batch, ranks, impl)]), max(table[(batch, ranks, impl)])]})
    ratios = []
    for batch in sorted({k[0] for k in med}):
        for ranks in sorted({k[1] for k in med}):
            g = {impl: med.get((batch, ranks, impl)) for impl in IMPLS}
            if None in g.values():
                continue
            for v in VARIANTS:
                if (batch, ranks, v) in med:
                    g[v] = med[(batch, ranks, v)]
            # per-round ratios too: paired, so less noisy than a ratio of medians
            paired = {}
            pairs = [("mpitrain", "ddp"), ("minimal", "ddp"), ("mpitrain", "minimal")]
            pairs += [(v, "minimal") for v in VARIANTS if v in g]
            for a, b in pairs:
                xs = [x / y for x, y in zip(table[(batch, ranks, a)], table[(batch, ranks, b)])]
                paired[f"{a}/{b}"] = statistics.median(xs)
            ratios.append({"batch": batch, "ranks": ranks,
                           "mpitrain/ddp": g["mpitrain"] / g["ddp"],
                           "minimal/ddp": g["minimal"] / g["ddp"],
                           "mpitrain/minimal": g["mpitrain"] / g["minimal"],
                           **{f"{v}/minimal": g[v] / g["minimal"] for v in VARIANTS if v in g},
                           "paired_median": paired})
    scaling = []
    for batch in sorted({k[0] for k in med}):
        for impl in (*IMPLS, *VARIANTS):
            t1, t2 = med.get((batch, 1, impl)), med.get((batch, 2, impl))
            if t1 and t2:
                scaling.append({"batch": batch, "impl": impl, "efficiency_2_ranks": t1 / t2})
    return {"rows": rows, "ratios": ratios, "scaling": scaling}


def print_summary(s: dict) -> None:
    print(f"{'batch':>6} {'ranks':>5} {'impl':>17} {'median step(ms)':>16} {'runs':>5} {'min..max(ms)':>18}")
    for r in s["rows"]:
        print(f"{r['batch']:>6} {r['ranks']:>5} {r['impl']:>17} {r['median_step_s'] * 1e3:>16.2f} "
              f"{r['runs']:>5} {r['spread_s'][0] * 1e3:>8.2f}..{r['spread_s'][1] * 1e3:<8.2f}")
    print(f"\n{'batch':>6} {'ranks':>5} {'mpitrain/ddp':>13} {'minimal/ddp':>12} "
          f"{'mpitrain/minimal':>17}   (paired per-round medians in brackets)")
    for r in s["ratios"]:
        p = r["paired_median"]
        print(f"{r['batch']:>6} {r['ranks']:>5} {r['mpitrain/ddp']:>7.3f} [{p['mpitrain/ddp']:.3f}]"
              f" {r['minimal/ddp']:>6.3f} [{p['minimal/ddp']:.3f}] {r['mpitrain/minimal']:>9.3f} "
              f"[{p['mpitrain/minimal']:.3f}]" + "".join(
                  f"  {v}/minimal {r[v + '/minimal']:.3f} [{p[v + '/minimal']:.3f}]"
                  for v in VARIANTS if v + "/minimal" in r))
    print(f"\n{'batch':>6} {'impl':>17} {'2-rank scaling efficiency T1/T2':>32}")
    for r in s["scaling"]:
        print(f"{r['batch']:>6} {r['impl']:>17} {r['efficiency_2_ranks']:>32.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help="among " + ", ".join((*IMPLS, *VARIANTS)))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write raw runs and the summary here")
    args = p.parse_args()
    impls = args.impls.split(",")
    runs = []
    t0 = time.time()
    for rnd in range(args.rounds):
        for batch in map(int, args.batches.split(",")):
            for ranks in map(int, args.ranks.split(",")):
                for impl in impls:
                    r = run_one(impl, ranks, batch, args.steps, args.warmup)
                    r["round"] = rnd
                    runs.append(r)
                    print(f"[{time.time() - t0:7.1f}s] round {rnd} batch {batch} ranks {ranks} "
                          f"{impl:>17}: {r['median_s'] * 1e3:8.2f} ms/step", flush=True)
    s = summarize(runs)
    print()
    print_summary(s)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, **s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
