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

from mpirun import REPO, child_env, processes_of, run

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
    """The process of MPI rank ``rank`` under ``launcher`` (its launcher's rank variable:
    PMI_RANK of hydra, OMPI_COMM_WORLD_RANK of Open MPI)."""
    wanted = {f"{var}={rank}".encode() for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"mpitrain" in cmdline and wanted & set(environ):
            return pid
    return None



def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


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


# --------------------------------------------------------------- --min-ranks: fewer ranks
# float64, so a run that continued on fewer ranks (another summation order) can be held to
# 1e-9 relative; a global batch of 48 that 4, 3 and 2 ranks all divide or split.
ELASTIC = ["--set", 'model.dtype="float64"', "--set", "model.layers=[32, 10]",
           "--set", "run.steps=40", "--set", "run.checkpoint_every=4", "--set", "data.val_fraction=0",
           "--set", 'sync.algorithm="ring"', "--set", "faults.deadline_ms=2000"]


# Rank 0 sleeps 25 ms before each layer's allreduce: a run of 40 steps lasts 2 s or more on
# any machine, so a kill "at a step after the checkpoint" always finds the job still running
# (a fast machine otherwise finished the relaunch before the test found its ranks).
SLOW = ["--fault", "kind=slow,rank=0,delay_ms=25"]


def batch(nprocs: int) -> list[str]:
    return ["--set", f"data.batch_size={48 // nprocs}"]


@pytest.fixture(scope="module")
def reference64(tmp_path_factory):
    """The uninterrupted float64 run (global batch 48) on 2 ranks."""
    out = tmp_path_factory.mktemp("restart64") / "full"
    res = run([*MPITRAIN, "run", "-n", "2", *ELASTIC, *batch(2), "--set", f'run.out="{out}"'],
              timeout=240)
    assert res.returncode == 0, res.output
    return params(out)


def start(out: Path, nprocs: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*MPITRAIN, "run", "-n", str(nprocs), *ELASTIC, *batch(nprocs),
                             "--set", f'run.out="{out}"', *extra], cwd=REPO, env=child_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def kill_ranks(proc: subprocess.Popen, ranks: list[int], when) -> None:
    """SIGKILL these ranks of ``proc``'s job, all at once, once ``when()`` holds."""
    deadline = time.time() + 120
    while not when():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    pids: list[int | None] = [None] * len(ranks)
    for _ in range(200):  # /proc may lag behind a busy machine
        pids = [rank_pid(proc.pid, r) for r in ranks]
        if all(pids) or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert all(pids), f"rank processes not found ({proc.poll()=})"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, out: Path) -> str:
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 10  # ranks leave shortly after the launcher does
    while processes_of(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_of(out), "processes left behind"
    return stderr


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k


def checkpointed(out: Path, step: int = 4):
    return lambda: (out / "checkpoints" / f"step-{step:08d}.npz").exists()


def test_two_ranks_killed_at_once_continue_on_the_two_left(tmp_path, reference64):
    out = tmp_path / "two"
    proc = start(out, 4, "--restarts", "2", "--min-ranks", "1", *SLOW)
    time.sleep(random.Random(4).uniform(0.0, 0.2))
    kill_ranks(proc, [1, 3], checkpointed(out))
    stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    assert_close(params(out), reference64)
    # 2 lost when the survivors lived to report; when MPI took them all down at once (MPICH's
    # hydra does, on the second death), the supervisor only knows that one died
    # (mpitrain.restarts)
    restarts = [e for e in events(out) if e["event"] == "restart"]
    assert [(e["ranks_before"], e["lost"] + e["ranks"]) for e in restarts] == [(4, 4)], stderr
    left = restarts[0]["ranks"]
    assert left < 4 and f"restart 1 of 2 in 1 s on {left} ranks" in stderr, stderr
    assert f"resumed on {left} ranks (the checkpoint's run had 4)" in stderr
    assert [(e["from"], e["to"]) for e in events(out) if e["event"] == "resized"] == [(4, left)]


def test_a_crash_fault_continues_without_the_crashed_rank(tmp_path, reference64):
    out = tmp_path / "crash"
    proc = start(out, 3, "--restarts", "1", "--min-ranks", "2",
                 "--fault", "kind=crash,rank=1,step=10")
    stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    assert "Injected fault: crash of rank 1 at step 10" in stderr
    assert "on 2 ranks (1 lost)" in stderr
    assert_close(params(out), reference64)
    assert [(e["from"], e["to"]) for e in events(out) if e["event"] == "resized"] == [(3, 2)]


def test_a_kill_during_the_restart_itself_is_survived_too(tmp_path, reference64):
    """The relaunched job loses a rank in its first steps: a second restart, on fewer.

    The first death is the crash fault of rank 3 (its survivors always report, so the
    relaunch has exactly ranks 0-2, and the rule is inert there); a SIGKILL's survivors may
    be taken down before they report, and the relaunch then runs on one rank only
    (mpitrain.restarts: the count errs on the safe side), which would leave no rank 1 to kill.
    """
    out = tmp_path / "again"
    proc = start(out, 4, "--restarts", "3", "--min-ranks", "1", *SLOW,
                 "--fault", "kind=crash,rank=3,step=6")
    kill_ranks(proc, [1], lambda: (out / "events.jsonl").exists()
               and any(e["event"] == "resized" for e in events(out)))
    stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    restarts = [e for e in events(out) if e["event"] == "restart"]
    assert len(restarts) == 2, stderr
    assert restarts[0]["ranks_before"] == 4 and restarts[1]["ranks_before"] == restarts[0]["ranks"]
    assert 4 > restarts[0]["ranks"] > restarts[1]["ranks"] >= 1
    assert_close(params(out), reference64)


def test_fewer_ranks_left_than_min_ranks_stop_with_one_message(tmp_path):
    out = tmp_path / "few"
    proc = start(out, 3, "--restarts", "2", "--min-ranks", "3", *SLOW)
    kill_ranks(proc, [2], checkpointed(out))
    started = time.monotonic()
    stderr = finish(proc, out)
    assert proc.returncode not in (0, None), stderr
    assert stderr.count("fewer than --min-ranks 3: not restarted") == 1, stderr
    assert "restart 1" not in stderr and time.monotonic() - started < 60
    assert [e["ranks"] for e in events(out) if e["event"] == "restart"] == [0]


@pytest.mark.parametrize("flags,message", [
    (["-n", "3", "--restarts", "1", "--min-ranks", "0"], "--min-ranks 0: must be between 1 and "
                                                         "the job's 3 ranks"),
    (["-n", "3", "--restarts", "1", "--min-ranks", "4"], "--min-ranks 4: must be between 1"),
    (["-n", "3", "--min-ranks", "2"], "--min-ranks 2 needs --restarts N"),
    (["--min-ranks", "2"], "--min-ranks 2 needs -n P")])
def test_min_ranks_is_checked(tmp_path, flags, message):
    res = run([*MPITRAIN, "run", *flags, "--set", f'run.out="{tmp_path}"'], timeout=60)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.output, \
        res.output


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_resumable(tmp_path):
    """SIGKILL the writer while the temporary file of the next checkpoint is on disk (seen
    from outside): the newest checkpoint is still the previous one, whole."""
    out = tmp_path / "write"
    writer = ("import sys, numpy as np; from pathlib import Path; from mpitrain import checkpoint\n"
              "out = Path(sys.argv[1])\n"
              "checkpoint.save(out, 1, {'w': np.ones(10)}, {'identity': {}}, keep=2)\n"
              "big = np.random.default_rng(0).normal(size=(8, 2**22))\n"
              "for step in range(2, 100):\n"
              "    checkpoint.save(out, step, {'w': big}, {'identity': {}}, keep=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(out)], cwd=REPO, env=child_env())
    try:
        folder = out / "checkpoints"
        deadline = time.time() + 60
        while not list(folder.glob(".step-00000002.npz.*.tmp")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    from mpitrain import checkpoint
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-00000001.npz"]
    arrays, meta = checkpoint.load(checkpoint.list_checkpoints(out)[-1])
    assert meta["step"] == 1 and np.array_equal(arrays["w"], np.ones(10))
