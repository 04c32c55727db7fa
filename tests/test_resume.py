"""Checkpoint and resume: an interrupted run, resumed, ends bitwise equal to an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mpirun import MPIEXEC, child_env, mpitrain

STEPS = 240
JOB = ["--set", f"run.steps={STEPS}", "--set", "run.checkpoint_every=40",
       "--set", "model.layers=[1024, 1024, 10]", "--set", "data.batch_size=64",
       "--set", "run.keep_checkpoints=2"]


def start(out, *extra):
    return subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "run",
                             "jobs/digits.toml", *JOB, "--set", f'run.out="{out}"', *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), start_new_session=True)


def wait_for_checkpoint(proc, out, step, timeout=60):
    target = out / "checkpoints" / f"step-{step:08d}.npz"
    deadline = time.time() + timeout
    while not target.exists():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint of step {step}: {proc.communicate()}")
        time.sleep(0.02)


def params(out):
    with np.load(out / "model.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    res = mpitrain(2, ["run", "jobs/digits.toml", *JOB, "--set", f'run.out="{out}"'], timeout=180)
    assert res.returncode == 0, res.output
    return params(out)


def assert_bitwise_equal(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{k} differs after resume"


def resume(out):
    res = mpitrain(2, ["run", "jobs/digits.toml", *JOB, "--set", f'run.out="{out}"', "--resume"],
                   timeout=180)
    assert res.returncode == 0, res.output
    assert "resumed from the checkpoint of step" in res.stderr
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps == list(range(1, STEPS + 1)), "metrics must hold each step exactly once"
    return params(out)


def test_killed_run_resumes_bitwise(tmp_path, reference):
    out = tmp_path / "killed"
    proc = start(out)
    wait_for_checkpoint(proc, out, 80)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up, as in a node failure
    proc.wait()
    assert not (out / "model.npz").exists()
    assert_bitwise_equal(resume(out), reference)


def test_preempted_run_checkpoints_at_a_step_boundary_and_resumes(tmp_path, reference):
    out = tmp_path / "preempted"
    proc = start(out)
    wait_for_checkpoint(proc, out, 40)
    os.kill(proc.pid, signal.SIGUSR1)  # mpiexec forwards it to every rank, like Slurm --signal
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert stderr.count("mpitrain: error: stopped by a signal at step") == 1, stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    stopped = [e["step"] for e in events if e["event"] == "preempted"]
    assert stopped and (out / "checkpoints" / f"step-{stopped[0]:08d}.npz").exists()
    assert_bitwise_equal(resume(out), reference)


def test_resume_on_more_ranks_than_the_global_batch_has_samples_is_refused(tmp_path):
    """Another rank count is elastic resume (tests/test_elastic.py), as long as every rank
    still gets a sample of the kept global batch."""
    out = tmp_path / "ranks"
    base = ["run", "--set", "run.steps=4", "--set", "run.checkpoint_every=2",
            "--set", "data.batch_size=1", "--set", f'run.out="{out}"']
    assert mpitrain(2, base, timeout=60).returncode == 0
    res = mpitrain(3, [*base, "--resume", "--set", "run.steps=6"], timeout=60)
    assert res.returncode == 2 and res.stderr.count("mpitrain: error:") == 1, res.output
    assert "3 ranks but the run's global batch is 2 samples" in res.stderr


def test_resume_refuses_a_different_training(tmp_path):
    out = tmp_path / "changed"
    base = ["run", "--set", "run.steps=4", "--set", "run.checkpoint_every=2",
            "--set", f'run.out="{out}"']
    assert mpitrain(2, base, timeout=60).returncode == 0
    res = mpitrain(2, [*base, "--resume", "--set", 'optim.name="sgd"', "--set", "model.layers=[32, 10]"],
                   timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.output
    assert res.stderr.count("mpitrain: error:") == 1
    assert ("belongs to a different training (model.layers [64, 10] -> [32, 10]; optim.name "
            "'adam' -> 'sgd')") in res.stderr


@pytest.mark.parametrize("change,allowed", [
    ("optim.lr=0.001", []), ("optim.lr=0.001", ["optim.lr"]), ("model.activation=\"tanh\"", []),
    ("data.shuffle=false", ["data.*"])])
def test_resume_names_every_change_and_accepts_only_allowed_ones(tmp_path, change, allowed):
    """Everything that changes the mathematics is compared; a deliberate change needs
    --allow-change and is recorded in events.jsonl."""
    out = tmp_path / "run"
    base = ["run", "--set", "run.steps=4", "--set", "run.checkpoint_every=2", "--set", f'run.out="{out}"']
    assert mpitrain(2, base, timeout=60).returncode == 0
    flags = [f for key in allowed for f in ("--allow-change", key)]
    res = mpitrain(2, [*base, "--set", "run.steps=6", "--set", change, "--resume", *flags],
                   timeout=60)
    key, value = change.split("=")
    if not allowed:
        assert res.returncode == 2 and res.stderr.count("mpitrain: error:") == 1, res.output
        assert f"belongs to a different training ({key} " in res.stderr
        assert "run.steps" not in res.stderr  # extending a run is not a different training
        return
    assert res.returncode == 0, res.output
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resume"]
    assert list(resumed[0]["changed"]) == [key], resumed


def test_resume_refuses_other_data_content(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 3))
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(64) % 2)
    base = ["run", "--set", "run.steps=4", "--set", "run.checkpoint_every=2", "--set", 'data.source="file"',
            "--set", f'data.path="{tmp_path / "d.npz"}"', "--set", "model.layers=[4, 2]",
            "--set", "data.batch_size=8", "--set", f'run.out="{tmp_path / "o"}"']
    assert mpitrain(2, base, timeout=60).returncode == 0
    x[3, 1] += 1.0
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(64) % 2)
    res = mpitrain(2, [*base, "--resume"], timeout=60)
    assert res.returncode == 2 and "data.content 'npz:x.npy=" in res.stderr, res.output


def test_a_fresh_start_never_destroys_an_earlier_run(tmp_path):
    out = tmp_path / "reused"
    first = ["run", "--set", "run.steps=4", "--set", "run.checkpoint_every=2", "--set", f'run.out="{out}"']
    assert mpitrain(4, first, timeout=60).returncode == 0
    kept = {p.name: p.read_bytes() for p in out.rglob("*.npz")}
    refused = mpitrain(2, ["run", "--set", "run.steps=2", "--set", f'run.out="{out}"'], timeout=60)
    assert refused.returncode == 2 and "holds an earlier run" in refused.stderr, refused.output
    assert "--overwrite" in refused.stderr
    # --overwrite, and the new run fails before its first checkpoint: the old run is put back
    failing = mpitrain(2, ["run", "--set", "run.steps=2", "--set", f'run.out="{out}"', "--overwrite",
                           "--set", "optim.lr=1e30", "--set", 'optim.name="sgd"'], timeout=60)
    assert failing.returncode == 3, failing.output
    assert {p.name: p.read_bytes() for p in out.rglob("*.npz")} == kept
    assert not (out / ".replaced").exists()
    res = mpitrain(2, ["run", "--set", "run.steps=2", "--set", f'run.out="{out}"', "--overwrite"],
                   timeout=60)
    assert res.returncode == 0 and "--overwrite: the earlier run" in res.stderr, res.output
    assert not (out / ".replaced").exists()
    for r in (0, 1):  # every rank's own files are this run's, none moved aside with the old
        assert (out / f"ledger-rank{r}.jsonl").exists() and (out / f"faults-rank{r}.jsonl").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002.npz"]
    assert sorted(p.name for p in out.glob("ledger-rank*")) == ["ledger-rank0.jsonl", "ledger-rank1.jsonl"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"kind": "st')
    resumed = mpitrain(2, ["run", "--set", "run.steps=3", "--set", f'run.out="{out}"', "--resume"],
                       timeout=60)  # a line cut short by a kill must not break the resume
    assert resumed.returncode == 0, resumed.output


def test_metrics_of_a_resumed_run_match_the_uninterrupted_run(tmp_path):
    """Step and epoch records, compared field by field (timings aside), mid-epoch resume included."""
    def records(out):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time_", "samples_per"))}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
    common = ["run", "--set", "run.steps=40", "--set", "data.val_fraction=0.1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert mpitrain(2, [*common, "--set", f'run.out="{full}"'], timeout=60).returncode == 0
    # the same run stopped at step 30 (mid-epoch: 25 steps per epoch), then resumed to 40
    first = mpitrain(2, ["run", "--set", "run.steps=30", "--set", "data.val_fraction=0.1",
                         "--set", f'run.out="{cut}"'], timeout=60)
    assert first.returncode == 0
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("".join(  # drop the early end's epoch record at 30
        line + "\n" for line in lines if json.loads(line)["step"] != 30
        or json.loads(line)["kind"] == "step"))
    assert mpitrain(2, [*common, "--set", f'run.out="{cut}"', "--resume"], timeout=60).returncode == 0
    want = records(full)
    got = records(cut)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-12), (k, a, b)
            else:
                assert a[k] == b[k], (k, a, b)
