"""``mpitrain bench allreduce`` under several MPIs and settings, interleaved round by round:
the own ring (checksums on) against each MPI's native allreduce, as mpitrain runs them.

    python benchmarks/bench_variants.py [--rounds 5] [--sizes 1M,4M,16M] VARIANT...

VARIANT is ``NAME[@PYTHON][:KEY=VALUE KEY2]`` as in benchmarks/mpi_native.py: PYTHON picks
the venv (hence the MPI and its launcher profile), KEY=VALUE is put in the environment of
``mpitrain bench`` (a user's setting wins over the profile's ``local_env``), KEY2 is
removed from it.  Each round runs every variant once (``-n 2 --algorithms native,ring``);
the table gives, per size, the median / min over rounds of each one's native and ring
times (each a median over its iterations, max over ranks) and the median of the per-round
ratios ring / native.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpi_native import parse_settings, size_text  # noqa: E402


def run_bench(variant: str, sizes: list[str], timeout: float) -> dict[tuple[str, int], float]:
    """One ``mpitrain bench allreduce`` of the variant: {(algorithm, bytes): seconds}."""
    head, _, settings = variant.partition(":")
    python = head.partition("@")[2] or sys.executable
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for key, value in parse_settings(settings).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [python, "-m", "mpitrain", "bench", "allreduce", "-n", "2", "-b", sizes[0],
               "-e", sizes[-1], "-f", "4", "--algorithms", "native,ring", "--json", str(out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode or not out.exists():
            raise SystemExit(f"variant {variant!r} failed ({res.returncode}):\n"
                             f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        rows = json.loads(out.read_text())["results"]
    return {(r["algorithm"], r["bytes"]): r["time_s"] for r in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME[@PYTHON][:KEY=VALUE KEY2]")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-bytes", default="1M")
    ap.add_argument("--max-bytes", default="16M")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per bench run")
    args = ap.parse_args()
    names = [v.partition(":")[0].partition("@")[0] for v in args.variants]
    rounds = []
    for i in range(args.rounds):
        rounds.append({n: run_bench(v, [args.min_bytes, args.max_bytes], args.timeout)
                       for n, v in zip(names, args.variants)})
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print("| size | variant | native med / min ms | ring med / min ms | ring / native |")
    print("| --- | --- | --- | --- | --- |")
    for nbytes in sorted({b for _, b in rounds[0][names[0]]}):
        for name in names:
            cells = []
            for algo in ("native", "ring"):
                ts = [r[name][(algo, nbytes)] * 1e3 for r in rounds]
                cells.append(f"{statistics.median(ts):.2f} / {min(ts):.2f}")
            ratio = statistics.median(r[name][("ring", nbytes)] / r[name][("native", nbytes)]
                                      for r in rounds)
            print(f"| {size_text(nbytes)} | {name} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
