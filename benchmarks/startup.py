"""Start-up: seconds from launching a 2-rank job to its first metrics record.

The clock starts just before ``mpiexec`` is spawned and stops when rank 0's
``metrics.jsonl`` holds its first line (polled every millisecond).  Runs interleave the jobs
and a baseline (``mpiexec -n 2 python -c "import numpy, mpi4py.MPI"``: the floor any
NumPy + MPI program pays) so noise hits all alike.

    python benchmarks/startup.py --rounds 7
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
JOBS = {"digits": ["jobs/digits.toml"],
        "mlp784": [str(HERE / "mlp.toml")]}


def first_record(job: list[str], ranks: int, timeout: float = 120) -> tuple[float, float]:
    """(seconds to the first metrics record, seconds to exit)."""
    out = tempfile.mkdtemp(prefix="mpitrain-startup-")
    metrics = Path(out) / "metrics.jsonl"
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpitrain", "run", *job,
           "--set", f"run.out={json.dumps(out)}", "--set", "run.steps=3",
           "--set", 'run.progress="off"']
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=HERE.parent)
    first = None
    while first is None:
        if metrics.exists() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
            break
        if proc.poll() is not None:
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError("timed out")
        time.sleep(0.001)
    err = proc.communicate()[1]
    done = time.perf_counter() - t0
    if proc.returncode or first is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    subprocess.run(["rm", "-rf", out])
    return first, done


def baseline(ranks: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-c",
                    "import numpy, mpi4py.MPI as M; M.COMM_WORLD.Barrier()"], check=True,
                   env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    res = {name: [] for name in JOBS}
    res["baseline_numpy_mpi4py"] = []
    for rnd in range(args.rounds):
        res["baseline_numpy_mpi4py"].append(baseline(args.ranks))
        for name, job in JOBS.items():
            res[name].append(first_record(job, args.ranks)[0])
        print(f"round {rnd}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in res.items()), flush=True)
    print(f"\n{args.ranks}-rank start-up, median of {args.rounds} interleaved rounds "
          f"(launch -> first metrics record; baseline: launch -> exit of numpy+mpi4py):")
    for k, v in res.items():
        print(f"  {k:>22}: {statistics.median(v):.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
