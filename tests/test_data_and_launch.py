"""Sharding, data files, the default job, and launching (mpitrain run -n, wrong launchers)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpirun import MPIEXEC, PROFILE, REPO, child_env, mpitrain, processes_of, run
from mpitrain import data, shard


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("tail", ["drop", "weighted"])
def test_shards_partition_each_global_batch_without_duplicates(size, tail):
    idx = np.arange(103)
    samplers = [shard.ShardSampler(idx, 5, r, size, seed=3, shuffle=True, tail=tail)
                for r in range(size)]
    one = shard.ShardSampler(idx, 5 * size, 0, 1, seed=3, shuffle=True, tail=tail)
    assert samplers[0].steps_per_epoch == one.steps_per_epoch
    for epoch in range(3):
        seen = []
        for k in range(one.steps_per_epoch):
            parts = [s.shard(epoch, k) for s in samplers]
            whole, n_global = one.shard(epoch, k)
            # P ranks with batch b see exactly what one process sees with batch P*b
            assert np.array_equal(np.concatenate([p[0] for p in parts]), whole)
            assert all(p[1] == n_global == len(whole) for p in parts)
            seen.extend(whole)
        assert len(seen) == len(set(seen)), "a sample was used twice in one epoch"
        expected = 103 if tail == "weighted" else (103 // (5 * size)) * 5 * size
        assert len(seen) == expected


def test_shards_are_a_pure_function_of_seed_epoch_rank_size():
    idx = np.arange(50)
    a = shard.ShardSampler(idx, 4, 1, 3, seed=9, shuffle=True, tail="drop")
    b = shard.ShardSampler(idx, 4, 1, 3, seed=9, shuffle=True, tail="drop")
    assert np.array_equal(a.shard(2, 1)[0], b.shard(2, 1)[0])
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1)), "epochs must reshuffle"
    c = shard.ShardSampler(idx, 4, 1, 3, seed=10, shuffle=True, tail="drop")
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))


def test_uncompressed_npz_is_memory_mapped_and_npy_folders_work(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = data.from_file(tmp_path / "d.npz")
    assert isinstance(ds.x, np.memmap) and ds.classes == 3
    assert np.array_equal(ds.x[[7, 2]], x[[7, 2]])
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    assert np.array_equal(data.from_file(tmp_path / "c.npz").x, x)
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "x.npy", x)
    np.save(tmp_path / "folder" / "y.npy", np.eye(3)[y])  # one-hot rows work too
    ds = data.from_file(tmp_path / "folder")
    assert isinstance(ds.x, np.memmap) and ds.target_width == 3
    xb, yb = ds.batch(np.array([0, 4]), np.float64, np)
    assert np.array_equal(yb, np.eye(3)[y[[0, 4]]])


def test_digits_is_the_real_data_set():
    ds = data.digits()
    assert ds.x.shape == (1797, 64) and ds.classes == 10
    assert np.bincount(ds.y).min() >= 170 and 0 <= ds.x.min() and ds.x.max() == 1.0


def test_default_job_learns_digits_on_two_ranks(tmp_path):
    res = mpitrain(2, ["run", "jobs/digits.toml", "--set", f'run.out="{tmp_path}"'], timeout=120)
    assert res.returncode == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs[-1]["val_accuracy"] >= 0.95, epochs[-1]
    for r in steps:
        assert {"step", "epoch", "loss", "time_compute", "time_comm", "time_wait",
                "time_total"} <= r.keys()
        assert 0 < r["time_compute"] <= r["time_total"] and r["time_wait"] >= 0
        assert r["time_compute"] + r["time_comm"] + r["time_wait"] == pytest.approx(r["time_total"])
    assert sum(r["time_wait"] for r in steps) > 0, "two ranks must wait for communication"
    assert all(r["time_comm"] > 0 for r in steps), "overlap on: reductions start in backward"
    assert (tmp_path / "config.toml").read_text().startswith("# resolved configuration")
    with np.load(tmp_path / "model.npz") as z:
        assert z["layers.0.weight"].shape == (64, 128) and z["layers.1.bias"].shape == (10,)


def test_run_n_starts_the_launcher_of_mpi4py(tmp_path):
    res = run([sys.executable, "-m", "mpitrain", "run", "-n", "2", "--set", "run.steps=3",
               "--set", f'run.out="{tmp_path}"'], timeout=60)
    assert res.returncode == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["samples"] == 64  # 2 ranks x batch 32: both ranks took part


def test_the_repository_jobs_are_links_to_the_built_in_jobs():
    """jobs/*.toml in a checkout are the package's job files (one copy, shipped in the wheel)."""
    from mpitrain import jobs
    links = sorted(p.relative_to(REPO / "jobs").with_suffix("").as_posix()
                   for p in (REPO / "jobs").rglob("*.toml"))
    assert links == jobs.names() and "faults/strict_drop" in links
    for name in links:
        link = REPO / "jobs" / f"{name}.toml"
        assert link.is_symlink() and link.resolve() == jobs.folder() / f"{name}.toml", name


def test_a_built_in_job_runs_by_name_from_any_folder(tmp_path, monkeypatch):
    from mpitrain import jobs
    from mpitrain.errors import ConfigError
    assert jobs.resolve("jobs/digits.toml") == "jobs/digits.toml"  # an existing file stays
    monkeypatch.chdir(tmp_path)
    for given in ("faults/crash", "faults/crash.toml", "jobs/faults/crash.toml"):
        assert jobs.resolve(given) == jobs.folder() / "faults" / "crash.toml"
    assert jobs.resolve(None) is None
    with pytest.raises(ConfigError, match="job file faults/crush does not exist") as err:
        jobs.resolve("faults/crush")
    assert "faults/crash" in str(err.value) and "chapter/two_gpus" in str(err.value)
    res = run([sys.executable, "-m", "mpitrain", "run", "regression", "--set", "run.steps=2",
               "--set", 'run.progress="off"'], timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.output
    assert (tmp_path / "runs" / "regression" / "model.npz").exists()  # the name is the stem


def test_a_foreign_launcher_is_detected(tmp_path):
    """What a launcher of another MPI looks like from inside: P processes, each of size 1."""
    res = run([sys.executable, "-m", "mpitrain", "run", "--set", f'run.out="{tmp_path}"'],
              timeout=60, env={"OMPI_COMM_WORLD_SIZE": "4"})
    assert res.returncode == 2
    assert "the launcher started 4 processes (OMPI_COMM_WORLD_SIZE=4) but MPI sees a world of 1" \
        in res.stderr
    assert "Traceback" not in res.output
    # srun's tasks each see a world of one: every task fails, the first one says why (once)
    res = run([sys.executable, "-m", "mpitrain", "run", "--set", f'run.out="{tmp_path}"'],
              timeout=60, env={"SLURM_PROCID": "1"})
    assert res.returncode == 2 and res.stderr == "", res.output
    res = run([sys.executable, "-m", "mpitrain", "run", "--set", f'run.out="{tmp_path}"'],
              timeout=60, env={"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert res.returncode == 2 and "the launcher started 2 processes (SLURM_STEP_NUM_TASKS=2)" \
        in res.stderr and "RuntimeWarning" not in res.stderr


def press_ctrl_c(argv: list[str], out: Path) -> tuple[int, str]:
    """Start ``argv`` (a training run writing to ``out``) as a terminal's foreground job
    would be, in a process group of its own; once training has begun, Ctrl-C (SIGINT to the
    whole group).  Returns (exit status, stderr) once the command has ended and no process
    of the run is left."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.exists(), "training never started"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        while processes_of(out) and time.monotonic() < deadline + 30:
            time.sleep(0.1)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job did not end after Ctrl-C:\n{proc.communicate()[1][-3000:]}")
    assert not processes_of(out), "ranks outlived Ctrl-C"
    return proc.returncode, err



def long_training(out: Path) -> list[str]:
    """`mpitrain run`'s options for a run that trains until stopped, writing to ``out``."""
    return ["--set", "run.steps=100000", "--set", f'run.out="{out}"']


@pytest.mark.parametrize("nprocs", [2, 4])
def test_ctrl_c_under_a_plain_mpiexec_is_what_the_readme_says(tmp_path, nprocs):
    """A terminal's Ctrl-C signals its foreground group.  Hydra (MPICH, Intel MPI) keeps the
    ranks in mpiexec's group: every rank is interrupted, and the job says so once.  Open MPI's
    ranks have groups of their own: only its mpiexec gets it and ends them with SIGTERM, a
    preemption to them (a checkpoint; README, "Exit status")."""
    status, err = press_ctrl_c([MPIEXEC, "-n", str(nprocs), sys.executable, "-m", "mpitrain",
                                "run", *long_training(tmp_path)], tmp_path)
    assert status != 0
    assert "Traceback" not in err, err
    if signal.SIGINT in PROFILE.rank_signals:  # the launcher's own group only
        assert "mpitrain: interrupted" not in err, err
        events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert events[-1]["event"] == "preempted", events
        assert list((tmp_path / "checkpoints").glob("step-*.npz"))
    else:
        assert err.count("mpitrain: interrupted") == 1, err


def test_ctrl_c_under_mpitrain_run_n_is_reported_once_on_every_mpi(tmp_path):
    """`mpitrain run -n P` hands Ctrl-C to the ranks themselves: 130 and one message, under
    every MPI."""
    status, err = press_ctrl_c([sys.executable, "-m", "mpitrain", "run", "-n", "2",
                                *long_training(tmp_path)], tmp_path)
    assert status == 130, err
    assert err.count("mpitrain: interrupted") == 1, err
    assert "Traceback" not in err, err


def test_a_container_cpu_quota_counts_as_fewer_cpus(tmp_path):
    from mpitrain.context import _cgroup_cpus
    assert _cgroup_cpus(str(tmp_path)) is None                    # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpus(str(tmp_path)) is None                    # v2, unlimited
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpus(str(tmp_path)) == 1.5                     # v2: docker --cpus 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpus(str(tmp_path)) == 2.0                     # v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_cpus(str(tmp_path)) is None                    # v1, unlimited
