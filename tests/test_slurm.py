"""The Slurm job scripts in jobs/slurm/, run on a real one-node Slurm cluster.

The session fixture starts the cluster with tests/slurm/cluster.sh (installing slurm-wlm and
munge with apt when root and missing; config, key, logs and state under a temp folder, no
systemd, nothing in /etc) and stops its daemons by PID at the end.  Where Slurm cannot be
had (not root and not installed, no apt), every test here is skipped with that reason.
Daemons that are installed but do not start are a failure, not a skip.

Jobs are submitted with sbatch and followed with `scontrol show job` under a timeout; a job
that overruns is cancelled and the test fails.  Each job is a few seconds of training.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpirun import Result, run

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
JOBS = REPO / "jobs" / "slurm"
# Own state folder and ports, so a developer's own test cluster (default ports) is left alone.
STATE = Path(os.environ.get("MT_TEST_SLURM_STATE", "/tmp/mpitrain-slurm-pytest"))
PORTS = {"MT_SLURM_CTLD_PORT": os.environ.get("MT_TEST_SLURM_CTLD_PORT", "16817"),
         "MT_SLURM_D_PORT": os.environ.get("MT_TEST_SLURM_D_PORT", "16818")}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without an outer Slurm job's variables (CI may run in one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(PORTS)
    env["MT_SLURM_STATE"] = str(STATE)
    env["SLURM_CONF"] = str(STATE / "slurm.conf")
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin:/sbin"
    env["PYTHONUNBUFFERED"] = "1"
    env["MT_PYTHON"] = sys.executable  # the jobs run this interpreter (its venv)
    env.update(extra or {})
    return env


def sh(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None,
       check: bool = True) -> Result:
    """Run cmd in its own process group; fail on timeout (and on error with ``check``)."""
    return run(cmd, timeout=timeout, env=env or _env(), check=check, inherit=False)


def _why_no_slurm() -> str | None:
    have = shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()
    have_munge = shutil.which("munged") or Path("/usr/sbin/munged").exists()
    if have and have_munge:
        return None
    missing = " and ".join(n for n, ok in (("slurm-wlm", have), ("munge", have_munge)) if not ok)
    if os.geteuid() != 0:
        return f"Slurm test cluster: {missing} not installed and not root, so cannot install it"
    if not shutil.which("apt-get"):
        return f"Slurm test cluster: {missing} not installed and no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm():
    """A running one-node cluster; yields the environment its clients need."""
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    env = _env()
    was_running = sh(["bash", str(CLUSTER), "status"], env=env, check=False).returncode == 0
    t0 = time.monotonic()
    res = sh(["bash", str(CLUSTER), "start"], timeout=600, env=env, check=False)
    if res.returncode != 0:
        if "apt-get" in res.stderr and "failed" in res.stderr:
            pytest.skip(f"Slurm test cluster: could not install packages: {res.stderr.strip()}")
        pytest.fail(f"Slurm test cluster did not start:\n{res.stderr[-4000:]}")
    print(f"slurm test cluster up in {time.monotonic() - t0:.1f}s (state {STATE})")
    yield env
    if not was_running:
        sh(["bash", str(CLUSTER), "stop"], timeout=120, env=env, check=False)


# ---- job helpers -------------------------------------------------------------------------

def submit(env, script: str, args: list[str], log: Path, sbatch_opts: list[str] = (),
           extra_env: dict[str, str] | None = None) -> str:
    res = sh(["sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}",
              *sbatch_opts, str(JOBS / script), *args], env={**env, **(extra_env or {})})
    return res.stdout.strip().split(";")[0]


def job_info(env, job_id: str) -> dict[str, str]:
    res = sh(["scontrol", "show", "job", "-o", job_id], env=env, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def wait_job(env, job_id: str, timeout: float = 120, log: Path | None = None,
             until=None) -> dict[str, str]:
    """Poll until the job has finished (or ``until(info)`` is true); cancel it on timeout."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if until(info) if until else info.get("JobState") in FINISHED:
            return info
        time.sleep(0.25)
    sh(["scancel", job_id], env=env, check=False)
    text = log.read_text() if log and log.exists() else "(no log)"
    pytest.fail(f"slurm job {job_id} not done after {timeout}s: {info}\n--- log\n{text[-3000:]}")


def exit_code(info: dict[str, str]) -> int:
    return int(info.get("ExitCode", "0:0").split(":")[0])


def run_job(env, script, args, tmp_path, timeout=120, **kw) -> tuple[str, dict, str]:
    log = tmp_path / f"{script}-%j.out"
    job_id = submit(env, script, args, log, **kw)
    info = wait_job(env, job_id, timeout, Path(str(log).replace("%j", job_id)))
    text = Path(str(log).replace("%j", job_id)).read_text()
    return job_id, info, text


def steps_done(out: Path) -> int:
    f = out / "metrics.jsonl"
    if not f.exists():
        return 0
    last = 0
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        last = max(last, int(rec.get("step", 0)))
    return last


def assert_same_params(a: Path, b: Path) -> None:
    with np.load(a) as za, np.load(b) as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            assert za[k].dtype == zb[k].dtype, k
            assert za[k].tobytes() == zb[k].tobytes(), f"{k} differs"


# ---- tests -------------------------------------------------------------------------------

def test_cluster_runs_two_ranks_with_pmi2(slurm):
    """srun --mpi=pmi2 gives one 2-rank MPI world with the PyPI MPICH wheel."""
    res = sh(["srun", "-n", "2", "--mpi=pmi2", sys.executable, "-c",
              "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size)"],
             env=slurm, timeout=60)
    assert sorted(res.stdout.split("\n")[:2]) == ["0 2", "1 2"], res.stdout


def test_train_job(slurm, tmp_path):
    out = tmp_path / "train-{slurm_job_id}"
    job_id, info, log = run_job(slurm, "train.sbatch",
                                ["jobs/digits.toml", "--set", "run.steps=30",
                                 "--set", "run.checkpoint_every=10"], tmp_path,
                                extra_env={"MT_OUT": str(out)})
    assert info["JobState"] == "COMPLETED" and exit_code(info) == 0, log
    run_dir = Path(str(out).replace("{slurm_job_id}", job_id))
    assert (run_dir / "model.npz").exists(), log
    assert (run_dir / "config.toml").exists()
    assert steps_done(run_dir) == 30
    assert list((run_dir / "checkpoints").glob("step-*.npz"))
    assert f"slurm job {job_id} restart 0" in log and "(2 tasks)" in log


STEPS = 600
ARGS = ["jobs/digits.toml", "--set", f"run.steps={STEPS}", "--set", "run.checkpoint_every=200",
        "--set", "run.progress=off"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory) -> Path:
    """The final parameters of ARGS run by train.sbatch without interruption."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _, info, log = run_job(slurm, "train.sbatch", ARGS, tmp, extra_env={"MT_OUT": str(tmp / "ref")})
    assert exit_code(info) == 0 and (tmp / "ref" / "model.npz").exists(), log
    return tmp / "ref" / "model.npz"


def test_preempted_job_requeues_resumes_and_matches(slurm, tmp_path, uninterrupted):
    """SIGUSR1 to the tasks (what --signal=USR1@N sends) -> checkpoint, exit 75, requeue,
    resume; the final parameters equal an uninterrupted run's bit for bit."""
    # The preempted run is slowed for its first ~50 steps (a "slow" fault: rank 0 sleeps
    # 20 ms before 100 collectives; timing only, the numbers are untouched) so the signal
    # lands mid-run on any machine.
    slow = ["--fault", "kind=slow,rank=0,delay_ms=20,count=100"]
    pre_out = tmp_path / "preempted"
    log_path = tmp_path / "preempted.out"
    job_id = submit(slurm, "train.sbatch", ARGS + slow, log_path,
                    extra_env={"MT_OUT": str(pre_out)})
    # Signal once training is under way (well before the end).
    wait_job(slurm, job_id, 60, log_path, until=lambda i: steps_done(pre_out) >= 10
             or i.get("JobState") in FINISHED)
    assert steps_done(pre_out) < STEPS, "the job finished before it could be signalled"
    sh(["scancel", "--signal=USR1", job_id], env=slurm)
    # The batch script sees exit 75 and runs `scontrol requeue`.
    wait_job(slurm, job_id, 60, log_path,
             until=lambda i: int(i.get("Restarts", 0)) >= 1 and i.get("JobState") == "PENDING")
    # Slurm holds a requeued job for cred_expire (15 s on the test cluster, 120 s by
    # default): releasing it early (`scontrol update StartTime=now`) races with the node,
    # which kills a launch whose credential it still holds as revoked.
    info = wait_job(slurm, job_id, 180, log_path)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and exit_code(info) == 0, log
    assert info["Restarts"] == "1"
    assert f"slurm job {job_id} restart 0" in log and f"slurm job {job_id} restart 1" in log
    assert "requeueing job" in log
    events = [json.loads(line) for line in (pre_out / "events.jsonl").read_text().splitlines()]
    kinds = [e.get("event") for e in events]
    assert "preempted" in kinds and "resume" in kinds, kinds
    stopped = next(e["step"] for e in events if e.get("event") == "preempted")
    assert 10 <= stopped < STEPS
    assert steps_done(pre_out) == STEPS
    assert_same_params(pre_out / "model.npz", uninterrupted)


def rank_pid(job_id: str, rank: int) -> int | None:
    """The process of MPI rank ``rank`` of Slurm job ``job_id`` on this node (its
    environment: SLURM_JOB_ID and PMI_RANK); `scancel --signal` cannot pick one task."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"PMI_RANK={rank}".encode()}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"mpitrain" in (proc / "cmdline").read_bytes() \
                    and want <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except OSError:  # gone, or not ours to read
            continue
    return None


def events_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_killed_rank_is_relaunched_in_the_allocation_and_matches(slurm, tmp_path,
                                                                 uninterrupted):
    """MT_RESTARTS=2: rank 1 SIGKILLed mid-run from outside; the script's mpitrain relaunches
    the run as a new srun step with --resume, in the same allocation (no requeue), and it
    ends with the uninterrupted run's parameters, bit for bit."""
    out, log_path = tmp_path / "killed", tmp_path / "killed.out"
    # The ring allreduce (at 2 ranks the same sums as native) with a 2 s deadline: the
    # survivor names the dead peer and reports promptly.
    job_id = submit(slurm, "train.sbatch", [*ARGS, "--set", "run.checkpoint_every=20",
                                            "--set", 'sync.algorithm="ring"',
                                            "--set", "faults.deadline_ms=2000",
                                            "--fault", "kind=slow,rank=0,delay_ms=20,count=300"],
                    log_path, extra_env={"MT_OUT": str(out), "MT_RESTARTS": "2"})
    wait_job(slurm, job_id, 90, log_path, until=lambda i: steps_done(out) >= 30
             or i.get("JobState") in FINISHED)
    pid = rank_pid(job_id, 1)
    assert pid is not None and steps_done(out) < STEPS, "no rank 1 to kill mid-run"
    os.kill(pid, signal.SIGKILL)
    info = wait_job(slurm, job_id, 180, log_path)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and exit_code(info) == 0, log
    assert info["Restarts"] == "0", "relaunched in the allocation, not requeued"
    assert "mpitrain: restart 1 of 2 in 1 s: the run ended with status" in log, log
    restarts = [e for e in events_of(out) if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["ranks"] == 2 and restarts[0]["step"] >= 20
    assert steps_done(out) == STEPS
    assert_same_params(out / "model.npz", uninterrupted)
    assert not list(out.glob("mpitrain-launch-*")), "the launch folder is removed"


def test_crash_with_min_ranks_goes_on_with_fewer_tasks(slurm, tmp_path):
    """The crash demo (rank 1 dies at step 6) with MT_RESTARTS=1 MT_MIN_RANKS=1: the lost
    rank is not replaced, the relaunch runs one task, the plan's rule for rank 1 is inert."""
    out = tmp_path / "crash"
    _, info, log = run_job(slurm, "faults.sbatch", ["jobs/faults/crash.toml"], tmp_path,
                           timeout=180, extra_env={"MT_OUT": str(out), "MT_RESTARTS": "1",
                                                   "MT_MIN_RANKS": "1"})
    assert info["JobState"] == "COMPLETED" and exit_code(info) == 0, log
    assert "restart 1 of 1 in 1 s on 1 ranks (1 lost)" in log, log
    assert "resumed on 1 ranks (the checkpoint's run had 2)" in log, log
    assert "fault demo finished: training completed" in log
    restart = next(e for e in events_of(out) if e["event"] == "restart")
    assert (restart["ranks_before"], restart["lost"], restart["ranks"]) == (2, 1, 1), restart
    assert "fault_rules_inert" in [e["event"] for e in events_of(out)]
    assert steps_done(out) == 12


def test_time_limit_signal_reaches_the_ranks(slurm, tmp_path):
    """The real thing, not scancel: `--time=1 --signal=USR1@50` makes Slurm signal the tasks
    10-40 s after the start (it checks time limits every ~30 s); the harness checkpoints and
    exits 75, the script requeues.  The requeued run is cancelled (it would be slowed again)."""
    out = tmp_path / "timelimit"
    log_path = tmp_path / "timelimit.out"
    job_id = submit(slurm, "train.sbatch",
                    ["jobs/digits.toml", "--set", "run.steps=1000", "--set", "run.progress=off",
                     "--fault", "kind=slow,rank=0,delay_ms=50"], log_path,
                    sbatch_opts=["--time=1", "--signal=USR1@50"],
                    extra_env={"MT_OUT": str(out)})
    try:
        info = wait_job(slurm, job_id, 75, log_path,
                        until=lambda i: int(i.get("Restarts", 0)) >= 1
                        or i.get("JobState") in FINISHED)
    finally:
        sh(["scancel", job_id], env=slurm, check=False)
    log = log_path.read_text()
    assert info.get("Restarts") == "1", log
    assert "exit code 75" in log and "requeueing job" in log, log
    assert list((out / "checkpoints").glob("step-*.npz")), log


def test_fault_demo_job(slurm, tmp_path):
    """The fault demo's default: drops survived (reliable delivery) or the ring without
    faults when no fault job file exists yet -- either way it trains to the end."""
    out = tmp_path / "faults"
    _, info, log = run_job(slurm, "faults.sbatch", ["--set", "run.steps=20"], tmp_path,
                           extra_env={"MT_OUT": str(out)})
    assert exit_code(info) == 0, log
    assert (out / "model.npz").exists() and steps_done(out) == 20, log
    assert "fault demo finished: training completed" in log


def test_fault_demo_strict_drop_fails_cleanly(slurm, tmp_path):
    """A dropped gradient message in strict mode: exit 3 with a message naming the step,
    and the job ends (no hang under srun)."""
    out = tmp_path / "drop"
    _, info, log = run_job(slurm, "faults.sbatch",
                           ["jobs/digits.toml", "--set", "run.steps=10",
                            "--set", "sync.algorithm=ring", "--set", "faults.deadline_ms=2000",
                            "--fault", "kind=drop,step=3,layer=1"], tmp_path, timeout=90,
                           extra_env={"MT_OUT": str(out)})
    assert info["JobState"] == "FAILED" and exit_code(info) == 3, log
    assert "step 3" in log and "unrecovered sync fault" in log, log


def test_bench_job(slurm, tmp_path):
    out = tmp_path / "bench"
    _, info, log = run_job(slurm, "bench.sbatch", ["--set", "run.steps=30"], tmp_path,
                           extra_env={"MT_OUT": str(out),
                                      "MT_ALGORITHMS": "native ring"})
    assert exit_code(info) == 0, log
    table = json.loads((out / "bench.json").read_text())
    assert set(table) == {"native", "ring"}, table
    for alg in table:
        assert (out / alg / "model.npz").exists()
        assert table[alg]["samples_per_s"] > 0
    assert "samples/s" in log


def test_mismatched_pmi_is_reported(slurm, tmp_path):
    """srun with the wrong PMI (--mpi=none here) starts P separate 1-rank worlds; the
    harness stops at start with exit 2 and names the right --mpi."""
    _, info, log = run_job(slurm, "train.sbatch", ["jobs/digits.toml", "--set", "run.steps=5"],
                           tmp_path, extra_env={"MT_OUT": str(tmp_path / "pmi"),
                                                "MT_SRUN_MPI": "none"})
    assert exit_code(info) == 2, log
    assert "MPI sees a world of 1" in log and "--mpi=pmi2" in log, log


@pytest.mark.parametrize("argv,message", [
    (["--srun", "pmi2"], "--srun pmi2 needs -n P"),
    (["-n", "2", "--srun", "pmi2"], "--srun: no srun on PATH")])
def test_srun_launch_is_checked(tmp_path, argv, message):
    """Bad input, no cluster needed: one message, exit 2 (no srun: the PATH has only python)."""
    only_python = {**_env(), "PATH": str(Path(sys.executable).parent)}
    res = sh([sys.executable, "-m", "mpitrain", "run", "jobs/digits.toml", *argv,
              "--set", f'run.out="{tmp_path}"'], env=only_python, check=False)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
