"""Elastic resume: a run keeps its global batch whatever the rank count it continues on."""
import json
import sys

import numpy as np
import pytest

from mpirun import mpitrain, run
from mpitrain import data, shard
from mpitrain.schema import FaultRule, inert_rules


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("tail", ["drop", "weighted"])
def test_any_rank_count_splits_the_same_global_batch(size, tail):
    idx = np.arange(103)
    one = shard.ShardSampler(idx, 10, 0, 1, seed=3, shuffle=True, tail=tail)
    ranks = [one.resized(r, size) for r in range(size)]
    assert all(s.steps_per_epoch == one.steps_per_epoch for s in ranks)
    for epoch in range(2):
        for k in range(one.steps_per_epoch):
            whole, n_global = one.shard(epoch, k)
            parts = [s.shard(epoch, k) for s in ranks]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), whole)
            assert all(p[1] == n_global for p in parts)
            if len(whole) == 10:  # a full batch: blocks as equal as integers allow
                sizes = [len(p[0]) for p in parts]
                assert max(sizes) - min(sizes) <= (0 if 10 % size == 0 else 1)


def test_a_fresh_sampler_keeps_the_old_blocks_when_size_divides_the_batch():
    idx = np.arange(40)
    plain = shard.ShardSampler(idx, 4, 2, 3, seed=1, shuffle=True, tail="drop")
    kept = shard.ShardSampler(idx, 99, 2, 3, seed=1, shuffle=True, tail="drop", global_batch=12)
    assert np.array_equal(plain.shard(0, 1)[0], kept.shard(0, 1)[0])
    assert np.array_equal(plain.shard(0, 1)[0], plain.epoch_order(0)[12 + 8:12 + 12])


# ----------------------------------------------------------------- resuming on another P
STEPS = 12
ELASTIC_JOB = ["run", "--set", 'model.dtype="float64"', "--set", "model.layers=[32, 10]",
               "--set", "data.batch_size=12", "--set", "run.checkpoint_every=5",
               "--set", 'sync.algorithm="ring"', "--set", "data.val_fraction=0"]


def params(out):
    with np.load(out / "model.npz") as z:
        return {k: z[k] for k in z.files}


def events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 12 steps on 2 ranks (global batch 24), never stopped."""
    out = tmp_path_factory.mktemp("elastic") / "full"
    res = mpitrain(2, [*ELASTIC_JOB, "--set", f"run.steps={STEPS}", "--set", f'run.out="{out}"'],
                   timeout=120)
    assert res.returncode == 0, res.output
    return params(out)


@pytest.mark.parametrize("first,then", [(2, 1), (2, 3), (2, 4), (4, 3)])
def test_a_run_resumed_on_another_rank_count_ends_as_the_uninterrupted_run(
        tmp_path, uninterrupted, first, then):
    """Steps 1-5 on FIRST ranks, 6-12 on THEN: the same samples and weights every step, so the
    same parameters up to summation order (float64: 1e-9 relative), whatever THEN is."""
    out = tmp_path / "run"
    at = ["--set", f'run.out="{out}"']
    batch = ["--set", f"data.batch_size={24 // first}"]  # the same global batch of 24
    assert mpitrain(first, [*ELASTIC_JOB, *batch, *at, "--set", "run.steps=5"],
                    timeout=120).returncode == 0
    res = mpitrain(then, [*ELASTIC_JOB, *batch, *at, "--set", f"run.steps={STEPS}", "--resume"],
                   timeout=120)
    assert res.returncode == 0, res.output
    assert f"resumed on {then} ranks (the checkpoint's run had {first})" in res.stderr
    got = params(out)
    for k, want in uninterrupted.items():
        assert np.allclose(got[k], want, rtol=1e-9, atol=1e-12), k
    resized = [e for e in events(out) if e["event"] == "resized"]
    assert resized == [{"event": "resized", "step": 5, "from": first, "to": then,
                        "global_batch": 24}]


def test_an_old_checkpoint_without_a_global_batch_resumes_with_its_own(tmp_path):
    """Checkpoints from before elastic resume recorded ranks and batch_size only."""
    out = tmp_path / "old"
    at = [*ELASTIC_JOB, "--set", f'run.out="{out}"']
    assert mpitrain(2, [*at, "--set", "run.steps=5"], timeout=120).returncode == 0
    path = out / "checkpoints" / "step-00000005.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["identity"]["data.global_batch"]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    res = mpitrain(3, [*at, "--set", "run.steps=6", "--resume"], timeout=120)
    assert res.returncode == 0, res.output
    assert "global batch of 24 samples is split into 8 per rank" in res.stderr


def test_a_changed_per_rank_batch_still_needs_allow_change(tmp_path):
    out = tmp_path / "batch"
    at = [*ELASTIC_JOB, "--set", f'run.out="{out}"']
    assert mpitrain(2, [*at, "--set", "run.steps=5"], timeout=120).returncode == 0
    res = mpitrain(3, [*at, "--set", "run.steps=6", "--set", "data.batch_size=8", "--resume"],
                   timeout=120)
    assert res.returncode == 2 and "data.batch_size 12 -> 8" in res.stderr, res.output
    res = mpitrain(3, [*at, "--set", "run.steps=6", "--set", "data.batch_size=8", "--resume",
                       "--allow-change", "data.batch_size"], timeout=120)
    assert res.returncode == 0 and "global batch of 24 samples" in res.stderr, res.output


# ------------------------------------------- a fault plan naming ranks the resumed run lacks
def test_a_rule_for_a_rank_the_resumed_run_lacks_is_inert(tmp_path, uninterrupted):
    """Steps 1-5 on 2 ranks, 6-12 on 1 with a crash of rank 1 at step 8 in the plan (valid
    for the checkpoint's run): on one rank the rule has nothing to act on, so it is kept
    inert (one line, one event) and the run ends as the uninterrupted one."""
    out = tmp_path / "run"
    at = [*ELASTIC_JOB, "--set", f'run.out="{out}"']
    assert mpitrain(2, [*at, "--set", "run.steps=5"], timeout=120).returncode == 0
    res = mpitrain(1, [*at, "--set", f"run.steps={STEPS}", "--resume",
                       "--fault", "kind=crash,rank=1,step=8"], timeout=120)
    assert res.returncode == 0, res.output
    assert res.stderr.count("rule 0 (crash): no such rank in this run of 1, inert") == 1, \
        res.stderr
    got = params(out)
    for k, want in uninterrupted.items():
        assert np.allclose(got[k], want, rtol=1e-9, atol=1e-12), k
    inert = [e for e in events(out) if e["event"] == "fault_rules_inert"]
    assert inert == [{"event": "fault_rules_inert", "step": 5, "rules": [0], "ranks": 1}]


def test_inert_rules_are_those_whose_rank_filters_name_a_missing_rank():
    rules = [FaultRule(kind="crash", rank=1, step=3), FaultRule(kind="crash", rank=0, src=1),
             FaultRule(kind="drop", src=0, dst=2), FaultRule(kind="drop", src=0),
             FaultRule(kind="slow", src=1)]
    assert inert_rules(rules, 1) == [0, 2, 4]  # a crash/slow rule acts on `rank` (else src)
    assert inert_rules(rules, 2) == [2]
    assert inert_rules(rules, 3) == []


@pytest.mark.parametrize("resume", [False, True])
def test_a_fresh_start_still_refuses_a_rule_for_a_rank_it_lacks(tmp_path, resume):
    """Without a checkpoint (--resume finds none: a fresh start) a rule naming a rank beyond
    -n can never apply: bad input, exit 2, as before."""
    out = tmp_path / "fresh"
    res = mpitrain(1, [*ELASTIC_JOB, "--set", f'run.out="{out}"', "--set", "run.steps=5",
                       "--fault", "kind=crash,rank=1,step=3", *["--resume"] * resume],
                   timeout=120)
    assert res.returncode == 2, res.output
    assert "rank = 1, but the job has 1 ranks (0..0)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_resume_refuses_a_rule_for_a_rank_neither_run_had(tmp_path):
    out = tmp_path / "neither"
    at = [*ELASTIC_JOB, "--set", f'run.out="{out}"']
    assert mpitrain(2, [*at, "--set", "run.steps=5"], timeout=120).returncode == 0
    res = mpitrain(1, [*at, "--set", "run.steps=8", "--resume",
                       "--fault", "kind=drop,src=0,dst=2"], timeout=120)
    assert res.returncode == 2, res.output
    assert ("dst = 2, but the job has 1 ranks (0..0), nor had the run it resumes (2)"
            in res.stderr), res.stderr


def test_a_crash_with_min_ranks_goes_on_without_the_crashed_rank(tmp_path):
    """The demo job's crash of rank 1, at -n 2 --min-ranks 1: the relaunch on one rank
    resumes although the plan names rank 1, and completes."""
    out = tmp_path / "crash"
    res = run([sys.executable, "-m", "mpitrain", "run", "-n", "2", "jobs/faults/crash.toml",
               "--restarts", "1", "--min-ranks", "1", "--set", f'run.out="{out}"'], timeout=180)
    assert res.returncode == 0, res.output
    assert "restart 1 of 1 in 1 s on 1 ranks (1 lost)" in res.stderr, res.stderr
    kinds = [e["event"] for e in events(out)]
    assert kinds.count("restart") == 1 and "fault_rules_inert" in kinds, kinds
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 12
