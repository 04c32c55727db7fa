"""Recovery: seconds from a rank's death to the job's next completed step.

    python benchmarks/recovery.py --mode restart [-n 3] [--rounds 5] [--min-ranks M]
    .venv-openmpi/bin/python benchmarks/recovery.py --mode shrink [-n 4] [--rounds 5]

A job (the digits MLP, ring allreduce, strict delivery with a 2 s deadline, a checkpoint every
5 steps) runs under ``mpitrain run -n P``; rank ``--victim`` is killed with SIGKILL from
outside, and the clock stops when ``metrics.jsonl`` holds the next step the job completes
(polled every millisecond).  Reported per round and as medians, the whole recovery and its
parts:

* ``--mode restart`` (any MPI): ``--restarts 1``; the kill comes once the first checkpoint
  exists, and the next step is the first after the checkpoint the run resumed from.  Parts:
  detection (the kill to the supervisor's "restart" event: the survivors' deadline, their
  agreement and exit) and the relaunch (the event to the first step: the pause before it,
  MPI start-up, set-up, reading the checkpoint, one step).
* ``--mode shrink`` (Open MPI's venv: ULFM): ``[faults] recovery = "shrink"``, rank 0 slowed
  to ~30 ms a step so that the kill after ``--at-step`` lands mid-run; the next step is the
  redone one.  Parts: the survivors' own recovery (``recover_s`` of the "shrink" event: the
  failure seen to the new synchronizer built) and the rest (the MPI runtime noticing the
  death, the redone step).  The run must then complete with status 0.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOB = ["jobs/digits.toml", "--set", "run.steps=400", "--set", "run.checkpoint_every=5",
       "--set", 'sync.algorithm="ring"', "--set", "faults.deadline_ms=2000",
       "--set", "data.val_fraction=0", "--set", 'run.progress="off"']


def records(path: Path) -> list[dict]:
    """The whole lines of a JSONL file being written (a line cut short is skipped)."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def rank_pid(out: Path, rank: int) -> int | None:
    """The process of MPI rank ``rank`` of the job writing to ``out`` (from /proc; hydra's
    rank variable or Open MPI's)."""
    names = {f"{var}={rank}".encode() for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(out).encode() not in (proc / "cmdline").read_bytes():
                continue
            if names & set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except OSError:
            continue
    return None


def wait_for(what, timeout: float = 300.0, poll: float = 0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(poll)
    raise TimeoutError("the job did not get there in time")


def launch(args: argparse.Namespace, out: Path, extra: list[str]) -> subprocess.Popen:
    """``mpitrain run -n N`` of the benchmark's job, writing to ``out``."""
    return subprocess.Popen([sys.executable, "-m", "mpitrain", "run", "-n", str(args.n), *JOB,
                             "--set", f'run.out="{out}"', *extra],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


def restart_round(args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """(kill -> restart event, restart event -> first step after the resume), seconds."""
    extra = ["--min-ranks", str(args.min_ranks)] if args.min_ranks else []
    proc = launch(args, out, ["--restarts", "1", *extra])
    try:
        wait_for(lambda: list((out / "checkpoints").glob("step-*.npz")))
        pid = wait_for(lambda: rank_pid(out, args.victim))
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        restart = wait_for(lambda: [e for e in records(out / "events.jsonl")
                                    if e["event"] == "restart"])[0]
        resumed = wait_for(lambda: [e for e in records(out / "events.jsonl")
                                    if e["event"] == "resume"])[0]["step"]
        wait_for(lambda: any(r["kind"] == "step" and r["step"] == resumed + 1
                             for r in records(out / "metrics.jsonl")))
        done = time.time()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return restart["t"] - killed, done - restart["t"]


def last_step(out: Path) -> int:
    return max((r["step"] for r in records(out / "metrics.jsonl") if r["kind"] == "step"),
               default=0)


def shrink_round(args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """(the survivors' recover_s, the rest of kill -> next completed step), seconds."""
    proc = launch(args, out, ["--set", 'faults.recovery="shrink"', "--set", "run.steps=60",
                              "--fault", "kind=slow,rank=0,delay_ms=30"])
    try:
        before = wait_for(lambda: last_step(out) >= args.at_step and last_step(out))
        os.kill(wait_for(lambda: rank_pid(out, args.victim)), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: last_step(out) > before)
        took = time.monotonic() - killed
        status = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if status != 0:
        sys.exit(f"the shrink run in {out} ended with status {status}: is {sys.executable} "
                 f"Open MPI's venv (make install MPI=openmpi)?")
    shrink = next(e for e in records(out / "events.jsonl") if e["event"] == "shrink")
    return shrink["recover_s"], took - shrink["recover_s"]


ROUNDS = {"restart": (restart_round, "detection", "relaunch to the next step"),
          "shrink": (shrink_round, "survivors' recovery", "detection and the redone step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(ROUNDS), default="restart")
    parser.add_argument("-n", type=int, default=3, help="ranks (default 3)")
    parser.add_argument("--victim", type=int, default=1, help="the rank killed (default 1)")
    parser.add_argument("--min-ranks", type=int, help="restart: continue on the ranks left")
    parser.add_argument("--at-step", type=int, default=10, help="shrink: kill after this step")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    one_round, first, second = ROUNDS[args.mode]
    parts = []
    with tempfile.TemporaryDirectory(prefix="mpitrain-recovery-") as tmp:
        for i in range(args.rounds):
            a, b = one_round(args, Path(tmp) / f"r{i}")
            parts.append((a, b))
            print(f"round {i + 1}: {a + b:6.2f} s  ({first} {a:5.2f} s, {second} {b:5.2f} s)",
                  flush=True)
    med = [statistics.median(p) for p in zip(*parts)]
    print(f"median of {args.rounds}, --mode {args.mode}, -n {args.n}"
          f"{f' --min-ranks {args.min_ranks}' if args.min_ranks else ''}: "
          f"{statistics.median(a + b for a, b in parts):.2f} s from the death to the next "
          f"step ({first} {med[0]:.2f} s, {second} {med[1]:.2f} s)")


if __name__ == "__main__":
    main()
