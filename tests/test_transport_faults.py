"""Fault injection through the transport, at 2 and 4 ranks (tests/comm_driver.py scenario).

Every job runs under mpiexec with its profile's keep-survivors flags (what `mpitrain run -n`
passes, so the survivors of a dead rank can report it) with a kill-on-timeout: a hang fails.
The job's status is judged as `mpitrain run -n` judges it, from the ranks' records
(tests/mpirun.py job()): Open MPI's mpiexec exits 0 with those flags whatever the ranks did.
"""
from __future__ import annotations

import json
import random
import sys

import pytest

from mpirun import REPO, job

from mpitrain.comm.faults import FaultInjector, FaultPlan, FaultRule
from mpitrain.comm.transport import MessageId
from mpitrain.tools.diagnose import diagnose
from mpitrain.errors import ConfigError

DRIVER = str(REPO / "tests" / "comm_driver.py")
DEADLINE, GRACE = 1.0, 0.25


def scenario(nprocs: int, cfg: dict, tmp_path, timeout: float = 60, cleanup_flag: bool = True):
    """Run the driver; return (Result, {rank: result dict}) -- ranks that died have none.
    ``Result.status`` is the job's status (tests/mpirun.py job())."""
    cfg = {"deadline": DEADLINE, "grace": GRACE, "outdir": str(tmp_path), **cfg}
    res = job(nprocs, [sys.executable, DRIVER, "scenario", json.dumps(cfg)],
              keep_survivors=cleanup_flag, timeout=timeout)
    results = {}
    for f in tmp_path.glob("result-*.json"):
        d = json.loads(f.read_text())
        results[d["rank"]] = d
    return res, results


def assert_same_error_everywhere(res, results, nprocs, *parts, error="SyncError"):
    assert res.status != 0, res.output[-2000:]
    assert "Traceback" not in res.output, res.output[-3000:]
    assert sorted(results) == list(range(nprocs)), res.output[-2000:]
    msgs = {d["message"] for d in results.values()}
    assert len(msgs) == 1, msgs                       # the same error on every rank
    assert {d["error"] for d in results.values()} == {error}
    assert len({d["reporter"] for d in results.values()}) == 1
    assert res.stdout.count("ERROR:") == 1, res.stdout  # printed once
    msg = msgs.pop()
    for part in parts:
        assert part in msg, msg
    return msg, results[0]["reporter"]


# ---------------------------------------------------------------- strict
@pytest.mark.parametrize("nprocs,algorithm,phase,src,dst,chunk", [
    (2, "ring", "allgather", 0, 1, 1),
    (4, "ring", "reduce_scatter", 1, 2, 1),
    (4, "tree", "broadcast", 0, 2, 1),
    (2, "recursive_doubling", "exchange", 1, 0, 1),
])
def test_strict_drop_is_attributed_on_every_rank(tmp_path, nprocs, algorithm, phase, src, dst, chunk):
    rule = {"kind": "drop", "step": 2, "layer": 1, "src": src, "dst": dst, "phase": phase}
    res, results = scenario(nprocs, {"algorithm": algorithm, "rules": [rule], "steps": 3}, tmp_path)
    msg, reporter = assert_same_error_everywhere(
        res, results, nprocs, "step 2, layer 1", f"rank {dst} received nothing from rank {src}",
        f"{algorithm} {phase}, chunk {chunk}", "Injected fault: drop (rule 0)")
    assert reporter == dst
    assert res.status == 3
    # within the deadline + the agreement window (+ scheduling margin on 2 cores)
    assert max(d["elapsed"] for d in results.values()) < DEADLINE + GRACE + 1.0


@pytest.mark.parametrize("nprocs,algorithm,mode", [(2, "ring", "bitflip"), (4, "tree", "nan")])
def test_strict_corruption_detected_by_checksum(tmp_path, nprocs, algorithm, mode):
    rule = {"kind": "corrupt", "corrupt": mode, "step": 1, "layer": 1, "src": 1}
    res, results = scenario(nprocs, {"algorithm": algorithm, "rules": [rule]}, tmp_path)
    assert_same_error_everywhere(res, results, nprocs, "step 1, layer 1", "corrupted message from rank 1",
                                 "checksum mismatch", f"Injected fault: corrupt ({mode})")


def test_strict_survives_duplicates_and_reordering(tmp_path):
    rules = [{"kind": "duplicate", "probability": 0.5}, {"kind": "reorder", "probability": 0.5}]
    res, results = scenario(4, {"algorithm": "ring", "rules": rules, "steps": 3,
                                "clean_first": True}, tmp_path)
    assert res.status == 0, res.output[-2000:]
    for d in results.values():
        assert d["digest"] == d["clean_digest"]
    assert sum(d["stats"]["stale_discarded"] for d in results.values()) > 0


# ----------------------------------------------------------------- lossy
def test_lossy_allgather_drop_named_by_replica_hash(tmp_path):
    # last allgather step of a 4-rank ring: rank r sends chunk r-1; nobody forwards it after
    rule = {"kind": "drop", "step": 1, "layer": 1, "src": 1, "dst": 2, "phase": "allgather", "chunk": 0}
    cfg = {"algorithm": "ring", "delivery": "lossy", "deadline": 0.3, "rules": [rule],
           "checks": ["hash", "e2e"]}
    res, results = scenario(4, cfg, tmp_path)
    msg, _ = assert_same_error_everywhere(
        res, results, 4, "replicas diverged at step 1: layer 1", "rank 2 differs from ranks 0, 1, 3",
        "rank 2 counted as absent: step 1, layer 1, ring allgather chunk 0 from rank 1",
        error="DivergenceError")
    assert results[0]["ranks"] == [2] and results[0]["layer"] == 1


def test_lossy_reduce_scatter_drop_named_by_end_to_end_check(tmp_path):
    rule = {"kind": "drop", "step": 1, "layer": 1, "src": 1, "dst": 2, "phase": "reduce_scatter"}
    cfg = {"algorithm": "ring", "delivery": "lossy", "deadline": 0.3, "rules": [rule],
           "checks": ["hash", "e2e"]}  # the hash check runs first and must see nothing
    res, results = scenario(4, cfg, tmp_path)
    assert_same_error_everywhere(
        res, results, 4, "end-to-end check failed at step 1, layer 1", "all replicas are equally wrong",
        "rank 2 counted as absent: step 1, layer 1, ring reduce_scatter chunk 1 from rank 1",
        error="ReductionError")


# -------------------------------------------------------------- reliable
@pytest.mark.parametrize("nprocs,algorithm,rules", [
    (4, "ring", [{"kind": "drop", "probability": 0.3}]),
    (4, "ring", [{"kind": "corrupt", "probability": 0.3}, {"kind": "corrupt", "corrupt": "nan", "probability": 0.3}]),
    (4, "tree", [{"kind": "duplicate", "probability": 0.5}]),
    (4, "recursive_doubling", [{"kind": "reorder", "probability": 0.5}]),
    (2, "ring", [{"kind": "delay", "probability": 0.5, "delay_ms": 80}, {"kind": "drop", "phase": "allgather"}]),
])
def test_reliable_is_bitwise_fault_free(tmp_path, nprocs, algorithm, rules):
    cfg = {"algorithm": algorithm, "delivery": "reliable", "rules": rules, "steps": 3, "clean_first": True}
    res, results = scenario(nprocs, cfg, tmp_path)
    assert res.status == 0, res.output[-2000:]
    assert all(d["status"] == "ok" for d in results.values())
    for d in results.values():
        assert d["digest"] == d["clean_digest"]
    assert sum(len(d["events"]) for d in results.values()) > 0
    kinds = {r["kind"] for r in rules}
    stats = {k: sum(d["stats"][k] for d in results.values()) for k in results[0]["stats"]}
    if kinds & {"drop", "corrupt"}:
        assert stats["retransmissions"] > 0 and stats["recovery_s"] > 0
    if "corrupt" in kinds:
        assert stats["corrupt_detected"] > 0


def test_reliable_random_plans_property(tmp_path):
    rng = random.Random(20240611)  # fixed master seed: replayable, varied plans
    for trial in range(3):
        rules = []
        for _ in range(rng.randint(1, 3)):
            rule = {"kind": rng.choice(["drop", "delay", "corrupt", "duplicate", "reorder"]),
                    "probability": round(rng.uniform(0.05, 0.4), 2), "delay_ms": rng.choice([5, 30])}
            if rng.random() < 0.5:
                rule["phase"] = rng.choice(["reduce_scatter", "allgather", "exchange", "reduce", "broadcast"])
            if rng.random() < 0.3:
                rule["count"] = rng.randint(1, 4)
            rules.append(rule)
        algorithm = ["ring", "recursive_doubling", "tree"][trial]
        cfg = {"algorithm": algorithm, "delivery": "reliable", "rules": rules, "seed": rng.randint(0, 999),
               "steps": 2, "clean_first": True, "layers": [rng.randint(1, 50), rng.randint(1, 400)],
               "dtype": rng.choice(["float32", "float64"])}
        out = tmp_path / f"t{trial}"
        out.mkdir()
        res, results = scenario(3, cfg, out)
        assert res.status == 0, (cfg, res.output[-2000:])
        for d in results.values():
            assert d["digest"] == d["clean_digest"], cfg


# ----------------------------------------------------------------- replay
def test_same_plan_and_seed_replay_the_same_faults(tmp_path):
    rules = [{"kind": "drop", "probability": 0.2}, {"kind": "corrupt", "probability": 0.2, "count": 2}]
    logs = []
    for i, seed in enumerate([7, 7, 8]):
        out = tmp_path / str(i)
        out.mkdir()
        res, results = scenario(4, {"algorithm": "ring", "delivery": "reliable", "rules": rules,
                                    "seed": seed, "steps": 3}, out)
        assert res.status == 0, res.output[-2000:]
        logs.append({r: d["events"] for r, d in results.items()})
    assert logs[0] == logs[1] and any(logs[0].values())
    assert logs[0] != logs[2]  # the seed matters


def test_injector_decisions_do_not_depend_on_call_order():
    plan = FaultPlan([{"kind": "drop", "probability": 0.5}, {"kind": "delay", "delay_ms": 3, "count": 2}], 3)
    mids = [MessageId(s, l, "ring", "allgather", c, 0, 1) for s in (1, 2) for l in (0, 1) for c in range(3)]
    a, b = FaultInjector(plan, 0), FaultInjector(plan, 0)
    fwd = {m: a.message_fault(m, 8) for m in mids}
    rev = {m: b.message_fault(m, 8) for m in reversed(mids)}
    drops = {m for m, h in fwd.items() if h and h.rule.kind == "drop"}
    assert drops == {m for m, h in rev.items() if h and h.rule.kind == "drop"}
    assert 0 < len(drops) < len(mids)
    assert sum(1 for h in fwd.values() if h and h.rule.kind == "delay") == 2  # count per sender


def test_bad_rules_are_config_errors():
    """Rules built in code are checked by the same schema as a job file's rules."""
    with pytest.raises(ConfigError, match="kind = \"explode\": allowed values are 'drop'"):
        FaultRule("explode")
    with pytest.raises(ConfigError, match="phase = \"scatter\": allowed values are"):
        FaultRule("drop", phase="scatter")
    with pytest.raises(ConfigError, match="unknown key 'sorce'.*did you mean 'src'"):
        FaultPlan([{"kind": "drop", "sorce": 1}])
    with pytest.raises(ConfigError, match="probability = 1.5: must be <= 1.0"):
        FaultRule("drop", probability=1.5)
    with pytest.raises(ConfigError, match="needs `rank`"):
        FaultRule("crash", step=2)


# ------------------------------------------------------ stragglers, crash
@pytest.mark.parametrize("rule,named", [
    ({"kind": "slow", "rank": 2, "delay_ms": 40}, "straggler: rank 2 arrived last"),
    ({"kind": "delay", "src": 1, "delay_ms": 40}, "waiting for messages from rank 1"),
])
def test_diagnose_names_the_slow_rank(tmp_path, rule, named):
    cfg = {"algorithm": "ring", "rules": [rule], "steps": 3, "ledger": str(tmp_path)}
    res, results = scenario(4, cfg, tmp_path)
    assert res.status == 0, res.output[-2000:]
    text, code = diagnose(tmp_path)
    assert code == 0, text
    assert named in text, text


@pytest.mark.parametrize("cfg,parts", [
    ({"rules": [{"kind": "crash", "rank": 1, "step": 2}]}, ["from rank 1", "Injected fault: crash of rank 1 at step 2"]),
    ({"die": {"rank": 1, "step": 2}}, ["from rank 1"]),
])
def test_crash_named_by_survivors(tmp_path, cfg, parts):
    res, results = scenario(4, {"algorithm": "ring", "steps": 3, "ledger": str(tmp_path), **cfg}, tmp_path)
    assert res.status == 3, res.output[-2000:]  # the survivors' synchronization fault
    assert sorted(results) == [0, 2, 3], res.output[-2000:]  # rank 1 is gone
    msgs = {d["message"] for d in results.values()}
    assert len(msgs) == 1, msgs
    msg = msgs.pop()
    for part in parts:
        assert part in msg, msg
    if "die" in cfg:
        assert "may have died" in results[0]["hint"]
    text, code = diagnose(tmp_path)
    assert code == 1 and "rank 1 never entered it" in text, text


def test_crash_without_keep_survivors_is_killed_not_hung(tmp_path):
    # every launcher's default: one rank exiting without MPI_Finalize kills all the others
    res, results = scenario(4, {"algorithm": "ring", "steps": 3, "rules": [{"kind": "crash", "rank": 1, "step": 2}]},
                            tmp_path, cleanup_flag=False, timeout=30)
    assert res.status != 0
    assert not results  # nobody lived to report: why `mpitrain run -n` keeps the survivors


def test_fence_brings_a_rank_that_finished_early_into_the_error(tmp_path):
    # rank 2 gets its broadcast and leaves the last collective; only the fence tells it
    rule = {"kind": "drop", "step": 2, "layer": 0, "src": 0, "dst": 1, "phase": "broadcast"}
    res, results = scenario(3, {"algorithm": "tree", "rules": [rule], "fence": True}, tmp_path)
    assert_same_error_everywhere(res, results, 3, "rank 1 received nothing from rank 0",
                                 "tree broadcast, chunk 0", "Injected fault: drop")


# ------------------------------------------- large payloads (header + separate payload)
# Layers above transport.INLINE_MAX bytes travel as a header message followed by the payload
# (sent straight from the gradient buffer in strict mode); these run the fault paths on them.
BIG = [3000, 300, 2500]  # float64: 24 KB, 2.4 KB, 20 KB; ring chunks at 2 ranks: 12 KB / 10 KB


@pytest.mark.parametrize("nprocs,algorithm,layers", [(2, "ring", [6000, 300, 5000]), (3, "tree", BIG),
                                                     (3, "recursive_doubling", BIG)])
def test_big_payload_corruption_and_drop_strict(tmp_path, nprocs, algorithm, layers):
    rule = {"kind": "corrupt", "step": 1, "layer": 2, "src": 1}
    res, results = scenario(nprocs, {"algorithm": algorithm, "rules": [rule], "layers": layers}, tmp_path)
    assert_same_error_everywhere(res, results, nprocs, "step 1, layer 2", "corrupted message from rank 1",
                                 "checksum mismatch", "Injected fault: corrupt (bitflip)")
    out = tmp_path / "drop"
    out.mkdir()
    rule = {"kind": "drop", "step": 2, "layer": 0, "src": 1}
    res, results = scenario(nprocs, {"algorithm": algorithm, "rules": [rule], "layers": layers,
                                     "steps": 3}, out)
    assert_same_error_everywhere(res, results, nprocs, "step 2, layer 0", "received nothing from rank 1",
                                 "Injected fault: drop")


def test_big_payload_strict_survives_duplicates_reorders_delays(tmp_path):
    rules = [{"kind": "duplicate", "probability": 0.4}, {"kind": "reorder", "probability": 0.4},
             {"kind": "delay", "probability": 0.2, "delay_ms": 5}]
    res, results = scenario(4, {"algorithm": "ring", "rules": rules, "steps": 3, "layers": [40000, 9000],
                                "dtype": "float32", "clean_first": True}, tmp_path)
    assert res.status == 0, res.output[-2000:]
    for d in results.values():
        assert d["digest"] == d["clean_digest"]
    assert sum(d["stats"]["stale_discarded"] for d in results.values()) > 0


@pytest.mark.parametrize("algorithm", ["ring", "tree", "recursive_doubling"])
def test_big_payload_reliable_is_bitwise_fault_free(tmp_path, algorithm):
    rules = [{"kind": "drop", "probability": 0.2}, {"kind": "corrupt", "probability": 0.2},
             {"kind": "corrupt", "corrupt": "nan", "probability": 0.2},
             {"kind": "duplicate", "probability": 0.3}, {"kind": "reorder", "probability": 0.3}]
    res, results = scenario(3, {"algorithm": algorithm, "delivery": "reliable", "rules": rules,
                                "steps": 3, "layers": BIG, "clean_first": True}, tmp_path)
    assert res.status == 0, res.output[-2000:]
    stats = {k: sum(d["stats"][k] for d in results.values()) for k in results[0]["stats"]}
    assert stats["retransmissions"] > 0 and stats["corrupt_detected"] > 0
    for d in results.values():
        assert d["digest"] == d["clean_digest"]


def test_big_payload_lossy_drop_named_by_end_to_end_check(tmp_path):
    rule = {"kind": "drop", "step": 1, "layer": 0, "src": 1, "dst": 0, "phase": "reduce_scatter"}
    cfg = {"algorithm": "ring", "delivery": "lossy", "deadline": 0.3, "rules": [rule],
           "layers": [6000, 300, 5000], "checks": ["hash", "e2e"]}
    res, results = scenario(2, cfg, tmp_path)
    assert_same_error_everywhere(res, results, 2, "end-to-end check failed at step 1, layer 0",
                                 "rank 0 counted as absent: step 1, layer 0, ring reduce_scatter",
                                 error="ReductionError")
