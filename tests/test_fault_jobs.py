"""The fault demonstrations of jobs/faults/, end to end, at 2 and 4 ranks.

Each asserts its outcome: the exact, attributed error (printed once, exit status 3, no
hang), the divergence report, bitwise equality after survived faults, the straggler named.
"""
import json
import sys
import time

import numpy as np
import pytest

from mpirun import run

from mpitrain.tools.diagnose import read_ledgers

RANKS = [2, 4]


def job(name, tmp_path, nprocs, *extra, timeout=60):
    """Run a fault job with `mpitrain run -n P`, the way the README shows it.

    (It starts mpiexec with its MPI's keep-survivors options: no rank is killed by the
    launcher while the ranks agree on the error, and the status is the ranks' own.)
    """
    res = run([sys.executable, "-m", "mpitrain", "run", "-n", str(nprocs),
               f"jobs/faults/{name}.toml", "--set", f'run.out="{tmp_path}"', *extra],
              timeout=timeout)
    res.ended = time.time()  # the ledgers' clock
    return res


def fault_to_end_s(res, out) -> float:
    """Seconds from the first rank entering the collective that failed (the one left open in
    the ranks' ledgers) to the job's end: how long the ranks took to give up and leave,
    without the start-up before it (Python, NumPy and MPI: seconds, more under load)."""
    by_rank, _, _ = read_ledgers(sorted(out.glob("ledger-rank*.jsonl")))
    opened = [c["t_enter"] for colls in by_rank.values() for c in colls.values() if c.get("open")]
    assert opened, "no rank's ledger has the failed collective open"
    return res.ended - min(opened)


def one_error(res) -> str:
    """The single error message of a failed run (asserting there is exactly one)."""
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("mpitrain: error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def params(out):
    with np.load(out / "model.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("nprocs", RANKS)
def test_strict_drop_is_an_attributed_error_within_the_deadline(tmp_path, nprocs):
    res = job("strict_drop", tmp_path, nprocs)
    assert res.returncode == 3
    receiver = 2 % nprocs  # ring: rank 1 sends its reduce-scatter chunks to rank 2 (mod P)
    assert (f"step 3, layer 1: rank {receiver} received nothing from rank 1 in 2 s "
            f"(deadline 2 s; ring reduce_scatter, chunk 1). Injected fault: drop (rule 0)."
            in one_error(res))
    # every rank gives up within the deadline (2 s), agrees, leaves, and mpiexec ends (a margin)
    assert fault_to_end_s(res, tmp_path) < 2.0 + 5.0
    report = run([sys.executable, "-m", "mpitrain", "diagnose", str(tmp_path)], timeout=30)
    assert report.returncode == 1
    assert "(step 3, layer 1, ring" in report.stdout and "never left it" in report.stdout


@pytest.mark.parametrize("nprocs", RANKS)
def test_lossy_allgather_loss_is_named_as_divergence_of_the_receiver(tmp_path, nprocs):
    res = job("lossy_allgather", tmp_path, nprocs)
    assert res.returncode == 3
    msg = one_error(res)
    # rank 0 misses the chunk it would then forward along the ring: it and the ranks after
    # it that had not yet received that chunk are wrong; the chunk's owner (P-1) is right
    wrong = "rank 0" if nprocs == 2 else "ranks " + ", ".join(map(str, range(nprocs - 1)))
    assert f"end-to-end check failed at step 3, layer 1 on {wrong} only" in msg
    assert "the replicas diverge" in msg and "rank 0 counted as absent: step 3, layer 1, ring allgather" in msg


def test_lossy_divergence_can_be_watched_with_warn(tmp_path):
    res = job("lossy_allgather", tmp_path, 2, "--set", 'faults.on_divergence="warn"')
    assert res.returncode == 0, res.output
    assert "warning: end-to-end check failed at step 3, layer 1 on rank 0 only" in res.stderr
    # the replica hash check sees the drift too, at its next run, in the layer that was hit
    # (two ranks that differ have no majority to take as the truth)
    assert "replicas diverged at step 5: layer 1 parameters: no majority: ranks 0 vs ranks 1" \
        in res.stderr
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "divergence" for e in events)


@pytest.mark.parametrize("nprocs", RANKS)
def test_lossy_reduce_scatter_loss_is_caught_by_the_end_to_end_check(tmp_path, nprocs):
    res = job("lossy_reduce_scatter", tmp_path, nprocs)
    assert res.returncode == 3
    msg = one_error(res)
    assert "end-to-end check failed at step 3, layer 1: the reduced gradient sums to" in msg
    assert "on every rank" in msg and "a contribution was lost during the reduction" in msg


def test_a_loss_in_a_fused_bucket_names_the_bucket(tmp_path):
    res = job("lossy_reduce_scatter", tmp_path, 2, "--set", "sync.bucket_bytes=1000000", "--set",
              'faults.rules=[{kind="drop", step=3, layer=0, phase="reduce_scatter", src=1, count=1}]')
    assert res.returncode == 3
    msg = one_error(res)
    assert "end-to-end check failed at step 3, layer 0: the reduced gradient sums to" in msg
    assert ("Messages lost: rank 0 counted as absent: step 3, layer 0 (fused layers 0..1), ring "
            "reduce_scatter chunk 1 from rank 1." in msg), msg


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """The fault-free run of jobs/faults/reliable.toml at each rank count."""
    outs = {}
    for nprocs in RANKS:
        out = tmp_path_factory.mktemp(f"clean{nprocs}")
        res = job("reliable", out, nprocs, "--set", "faults.rules=[]")
        assert res.returncode == 0, res.output
        outs[nprocs] = params(out)
    return outs


def assert_bitwise(got, want):
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{k} differs from the fault-free run"


@pytest.mark.parametrize("nprocs", RANKS)
def test_reliable_delivery_survives_and_matches_the_fault_free_run_bitwise(tmp_path, nprocs,
                                                                            clean_runs):
    res = job("reliable", tmp_path, nprocs, timeout=120)
    assert res.returncode == 0, res.output
    assert_bitwise(params(tmp_path), clean_runs[nprocs])
    transport = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()
                 if '"transport"' in line][-1]
    assert transport["retransmissions"] > 0 and transport["corrupt_detected"] > 0
    assert "retransmitted" in res.stderr  # the cost is reported to the user
    kinds = {json.loads(line)["kind"] for r in range(nprocs)
             for line in (tmp_path / f"faults-rank{r}.jsonl").read_text().splitlines()}
    assert {"drop", "corrupt", "duplicate", "reorder"} <= kinds


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_reliable_plans_never_change_the_result(tmp_path, seed, clean_runs):
    rng = np.random.default_rng(seed)
    rules = ", ".join(f'{{kind="{k}", probability={rng.uniform(0.01, 0.1):.3f}}}'
                      for k in rng.choice(["drop", "corrupt", "duplicate", "reorder", "delay"],
                                          size=3, replace=False))
    res = job("reliable", tmp_path, 2, "--set", f"faults.rules=[{rules}]",
              "--set", f"faults.seed={seed}", timeout=120)
    assert res.returncode == 0, res.output
    assert_bitwise(params(tmp_path), clean_runs[2])


def test_fault_plans_replay_exactly(tmp_path):
    def hits(out):
        return [{k: v for k, v in json.loads(line).items() if k != "t"}
                for r in range(2) for line in (out / f"faults-rank{r}.jsonl").read_text().splitlines()]
    a, b = tmp_path / "a", tmp_path / "b"
    assert job("reliable", a, 2).returncode == 0
    assert job("reliable", b, 2).returncode == 0
    assert hits(a) == hits(b) and len(hits(a)) > 10


@pytest.mark.parametrize("nprocs", RANKS)
def test_corruption_is_detected_by_checksum(tmp_path, nprocs):
    res = job("corrupt", tmp_path, nprocs)
    assert res.returncode == 3
    msg = one_error(res)
    assert "step 3, layer 0: rank" in msg and "received a corrupted message from rank" in msg
    assert "(tree broadcast" in msg and "checksum mismatch. Injected fault: corrupt (bitflip)" in msg


def test_a_nan_message_is_caught_before_the_optimizer_step(tmp_path):
    res = job("corrupt", tmp_path, 2, "--set", 'faults.delivery="lossy"', "--set",
              'faults.rules=[{kind="corrupt", corrupt="nan", step=3, layer=0}]')
    assert res.returncode == 3
    msg = one_error(res)
    assert "step 3, layer 0: the reduced gradient holds NaN/Inf on" in msg
    assert "every rank's own gradient was finite: a corrupted message carried it in" in msg
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2, "step 3 must not have been applied"


def test_without_checksums_strict_delivery_lets_a_nan_in_and_the_end_to_end_check_stops_it(tmp_path):
    res = job("corrupt", tmp_path, 2, "--set", 'faults.checksum="none"', "--set",
              'faults.rules=[{kind="corrupt", corrupt="nan", step=3, layer=0}]')
    assert res.returncode == 3
    msg = one_error(res)
    assert "step 3, layer 0: the reduced gradient holds NaN/Inf on" in msg
    assert "[faults] checksum = \"none\"" in res.stderr  # the hint says why nothing caught it
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2, "step 3 must not have been applied"


def test_without_checksums_a_bit_flip_is_named_as_an_altered_message_not_a_loss(tmp_path):
    res = job("corrupt", tmp_path, 2, "--set", 'faults.checksum="none"')
    assert res.returncode == 3
    msg = one_error(res)
    assert ("end-to-end check failed at step 3, layer 0 on rank 1 only" in msg
            and "a message to them was altered in flight and no checksum caught it. Injected "
                "faults: step 3, layer 0, tree broadcast, chunk 0, message 0->1: corrupt "
                "(bitflip) (rule 0)." in msg), msg
    assert "lost" not in msg and 'with a checksum ("xxh3", "crc32c"), strict delivery names' in res.stderr


@pytest.mark.parametrize("nprocs", RANKS)
def test_a_straggler_is_named_by_diagnose(tmp_path, nprocs):
    res = job("straggler", tmp_path, nprocs)
    assert res.returncode == 0, res.output
    report = run([sys.executable, "-m", "mpitrain", "diagnose", str(tmp_path)], timeout=30)
    assert report.returncode == 0, report.stdout
    assert "straggler: rank 1 arrived last" in report.stdout, report.stdout


@pytest.mark.parametrize("nprocs", RANKS)
def test_a_crashed_rank_is_named_and_the_run_resumes(tmp_path, nprocs):
    base = [sys.executable, "-m", "mpitrain", "run", "-n", str(nprocs), "jobs/faults/crash.toml",
            "--set", f'run.out="{tmp_path}/run"']
    res = run(base, timeout=60)
    assert res.returncode != 0
    msg = one_error(res)
    assert "step 6, layer 1: rank" in msg and "received nothing from rank 1" in msg
    assert "crash of rank 1 at step 6" in msg
    resumed = run([*base, "--resume", "--set", "faults.rules=[]"], timeout=60)
    assert resumed.returncode == 0, resumed.output
    assert "resumed from the checkpoint of step 4" in resumed.stderr
    clean = run([*base[:-1], f'run.out="{tmp_path}/clean"', "--set", "faults.rules=[]"], timeout=60)
    assert clean.returncode == 0
    assert_bitwise(params(tmp_path / "run"), params(tmp_path / "clean"))


def test_the_chapter_scenario_with_one_lost_message_in_each_delivery_mode(tmp_path):
    """Strict turns the lost message into an error, lossy into a named wrong average,
    reliable into a retransmission with the fault-free result."""
    def chapter(mode, out, *extra):
        return run([sys.executable, "-m", "mpitrain", "run", "-n", "2",
                    "jobs/chapter/two_gpus.toml", "--set", "sync.algorithm=ring",
                    "--set", f"faults.delivery={mode}", "--set", "faults.deadline_ms=2000",
                    "--set", f'run.out="{tmp_path / out}"', *extra], timeout=60)
    lost = ["--fault", "kind=drop,step=5,layer=1,src=1,count=1"]
    strict = chapter("strict", "strict", *lost)
    assert strict.returncode == 3
    assert "step 5, layer 1: rank 0 received nothing from rank 1" in one_error(strict)
    lossy = chapter("lossy", "lossy", *lost)
    assert lossy.returncode == 3
    assert "a contribution was lost during the reduction" in one_error(lossy)
    reliable = chapter("reliable", "reliable", *lost)
    assert reliable.returncode == 0 and "2 retransmitted" in reliable.stderr
    clean = chapter("reliable", "clean")
    assert clean.returncode == 0
    assert_bitwise(params(tmp_path / "reliable"), params(tmp_path / "clean"))
