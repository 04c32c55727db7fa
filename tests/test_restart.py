"""`mpitrain run -n P --restarts N`: a job that loses a rank comes back from its newest
checkpoint and ends as the uninterrupted run would; the launcher's exit status is the job's."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpirun import REPO, child_env, run

MPITRAIN = [sys.executable, "-m", "mpitrain"]
STEPS = 200
JOB = ["jobs/digits.toml", "--set", f"run.steps={STEPS}", "--set", "run.checkpoint_every=10",
       "--set", "faults.deadline_ms=2000", "--set", 'sync.algorithm="ring"',
       "--set", "model.layers=[256, 10]"]


def params(out: Path) -> dict:
    with np.load(out / "model.npz") as z:
        return {k: z[k] for k in z.files}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(launcher: int, rank: int) -> int | None:
    """The process of MPI rank ``rank`` under ``launcher`` (PMI_RANK in its environment)."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"mpitrain" in cmdline and f"PMI_RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("restart") / "full"
    res = run([*MPITRAIN, "run", "-n", "3", *JOB, "--set", f'run.out="{out}"'], timeout=240)
    assert res.returncode == 0, res.output
    return params(out)


@pytest.mark.parametrize("victim", [1, 2])
def test_a_rank_killed_from_outside_is_survived_by_a_restart(tmp_path, reference, victim):
    out = tmp_path / "killed"
    proc = subprocess.Popen([*MPITRAIN, "run", "-n", "3", *JOB, "--set", f'run.out="{out}"',
                             "--restarts", "2"], cwd=REPO, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("step-*.npz")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
        time.sleep(random.Random(victim).uniform(0.0, 0.3))  # a step somewhere after it
        pid = None
        for _ in range(100):  # /proc may lag behind a busy machine
            pid = rank_pid(proc.pid, victim)
            if pid is not None or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert pid is not None, f"rank process not found ({proc.poll()=})"
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    assert stderr.count("mpitrain: restart 1 of 2") == 1, stderr
    got = params(out)
    assert got.keys() == reference.keys()
    for k in reference:  # the same rank count resumes bitwise
        assert np.array_equal(got[k], reference[k]), k
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["attempt"] for e in events if e["event"] == "restart"] == [1]
    assert not descendants(proc.pid), "processes left behind"


def test_bad_input_is_never_retried(tmp_path):
    res = run([*MPITRAIN, "run", "-n", "2", "--restarts", "3", "--set", "optim.lr=-1",
               "--set", f'run.out="{tmp_path}"'], timeout=60)
    assert res.returncode == 2 and "restart" not in res.stderr, res.output


def test_restarts_need_the_launcher(tmp_path):
    res = run([*MPITRAIN, "run", "--restarts", "1", "--set", f'run.out="{tmp_path}"'], timeout=60)
    assert res.returncode == 2 and "--restarts 1 needs -n P" in res.stderr, res.output


def test_more_ranks_than_the_machine_holds_fail_fast(tmp_path):
    started = time.monotonic()
    res = run([*MPITRAIN, "run", "-n", "100000", "--set", f'run.out="{tmp_path}"'], timeout=60)
    assert res.returncode == 2, res.output
    assert "-n 100000: this machine has" in res.stderr and "Traceback" not in res.output
    assert time.monotonic() - started < 30


def test_a_crashed_rank_makes_the_job_exit_3(tmp_path):
    """hydra alone would OR the crashed rank's 70 with the survivors' 3 (71); the launcher
    reports the job's own status, with the survivors' message once."""
    res = run([*MPITRAIN, "run", "-n", "2", "faults/crash", "--set", f'run.out="{tmp_path}"'],
              timeout=120)
    assert res.returncode == 3, res.output
    assert res.stderr.count("mpitrain: error:") == 1
    assert "Injected fault: crash of rank 1 at step 6" in res.stderr
