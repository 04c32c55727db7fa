"""The checks' native collectives have a deadline (mpitrain/comm/guarded.py), under a plain
``mpiexec`` at 2 and 3 ranks -- and so do every other collective of a run: validation, the
end-of-run reports, ``mpitrain evaluate``.

A rank that gets stuck after the step's fence, before the replica or end-to-end check, used
to leave the others inside a blocking MPI collective for ever (only a supervisor's kill
ended the job).  Now the others give up at the deadline and agree on one message naming
the rank that did not arrive, the step and the check; they exit 3, and mpiexec ends the
stuck rank.
"""
from __future__ import annotations

import json
import sys

import pytest

from mpirun import MPIEXEC, REPO, run

DRIVER = str(REPO / "tests" / "comm_driver.py")
DEADLINE = 1.0
STUCK_S = 600  # far beyond the test's timeout: the old code hung until it was killed


@pytest.mark.parametrize("nprocs,stuck,checks,check", [
    (2, 1, ["hash", "e2e"], "the replica check"),
    (3, 2, ["e2e"], "the end-to-end check"),
    (3, 0, ["hash"], "the replica check"),
])
def test_a_rank_stuck_before_a_check_is_named_by_the_others(tmp_path, nprocs, stuck, checks,
                                                            check):
    cfg = {"algorithm": "ring", "deadline": DEADLINE, "grace": 0.25, "steps": 3,
           "fence": True, "checks": checks, "outdir": str(tmp_path),
           "stall": {"rank": stuck, "step": 2, "seconds": STUCK_S}}
    res = run([MPIEXEC, "-n", str(nprocs), sys.executable, DRIVER, "scenario", json.dumps(cfg)],
              timeout=60)
    results = {d["rank"]: d for d in
               (json.loads(f.read_text()) for f in tmp_path.glob("result-*.json"))}
    survivors = sorted(set(range(nprocs)) - {stuck})
    assert sorted(results) == survivors, res.output[-3000:]
    assert {d["error"] for d in results.values()} == {"SyncError"}, results
    assert {d["exit_code"] for d in results.values()} == {3}
    messages = {d["message"] for d in results.values()}
    assert len(messages) == 1, messages  # one agreed message ...
    assert res.stdout.count("ERROR:") == 1, res.stdout  # ... printed once
    msg = messages.pop()
    assert f"step 2, {check}: rank {stuck} did not arrive within the deadline" in msg, msg
    assert {tuple(d["ranks"]) for d in results.values()} == {(stuck,)}
    assert "Traceback" not in res.output, res.output[-3000:]
    assert res.returncode != 0


def cli_with_one_rank_stopped(tmp_path, nprocs: int, stopped: dict, args: list[str]):
    """``mpiexec -n nprocs mpitrain ARGS`` with one rank stopped (tests/comm_driver.py cli):
    (the result, each rank's exit status as it told the launch folder)."""
    launch = tmp_path / "launch"
    launch.mkdir()
    # A rank that dies is no hang under mpiexec's own clean-up (it kills the others at
    # once); without it, as under `mpitrain run -n`, the others are left to end themselves.
    cleanup = ["-disable-auto-cleanup"] if stopped["how"] == "die" else []
    res = run([MPIEXEC, *cleanup, "-n", str(nprocs), sys.executable, DRIVER, "cli",
               json.dumps(stopped), *args, "--set", f"faults.deadline_ms={DEADLINE * 1e3:g}"],
              timeout=90, env={"_MPITRAIN_LAUNCH_DIR": str(launch)})
    exits = {int(f.name.split("-")[1]): int(f.read_text()) for f in launch.glob("exit-*")}
    return res, exits


def assert_named_once(res, exits: dict, nprocs: int, stopped: int, where: str) -> None:
    """The others end with one message naming the stopped rank, and exit status 3."""
    assert exits == {r: 3 for r in range(nprocs) if r != stopped}, (exits, res.output[-3000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("mpitrain: error:")]
    assert len(errors) == 1, res.output[-3000:]
    assert f"{where}: rank {stopped} did not arrive within the deadline" in errors[0], errors
    assert f"deadline {DEADLINE:g} s" in errors[0], errors
    assert "Traceback" not in res.output, res.output[-3000:]


@pytest.mark.parametrize("nprocs,stopped,at,how,algorithm,where", [
    (2, 1, "report_transport", "stall", "ring", "step 3, the end-of-run report"),
    (3, 0, "report_fault_outcome", "stall", "native", "step 3, the end-of-run report"),
    (3, 0, "report_transport", "die", "ring", "step 3, the end-of-run report"),
    (3, 2, "evaluate", "stall", "native", "step 3, the validation"),
    (2, 1, "evaluate", "die", "ring", "step 3, the validation"),
])
def test_a_rank_missing_at_the_end_or_in_validation_is_named_by_the_others(
        tmp_path, nprocs, stopped, at, how, algorithm, where):
    """Validation and the end-of-run reports (transport totals, fault outcome, traffic) used
    blocking native collectives: the others waited there for ever."""
    res, exits = cli_with_one_rank_stopped(
        tmp_path, nprocs, {"rank": stopped, "at": at, "how": how},
        ["run", "--set", f"run.out={tmp_path / 'out'}", "--set", "run.steps=3",
         "--set", f"sync.algorithm={algorithm}"])
    assert_named_once(res, exits, nprocs, stopped, where)


def test_a_rank_stuck_in_mpitrain_evaluate_is_named_by_the_others(tmp_path):
    out = tmp_path / "out"
    run([sys.executable, "-m", "mpitrain", "run", "--set", f"run.out={out}",
         "--set", "run.steps=2"], timeout=90, check=True)
    res, exits = cli_with_one_rank_stopped(tmp_path, 2, {"rank": 1, "at": "evaluate",
                                                          "how": "stall"}, ["evaluate", str(out)])
    assert_named_once(res, exits, 2, 1, "the evaluation")
