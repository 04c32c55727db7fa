"""bench allreduce / bench train / simulate: correctness of the measurements and the model."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from mpirun import mpiexec, run
from mpitrain.cli import main as mpitrain_main
from mpitrain.tools import simulate_calibration as cal
from mpitrain.tools import simulate_model as sim
from mpitrain.tools.bench_allreduce import expected_sum, fill_pattern, sweep_sizes
from mpitrain.tools.bench_train import summarize_steps


def test_allreduce_sweep_is_exact_for_every_algorithm(tmp_path):
    out = tmp_path / "ar.json"
    res = mpiexec(2, ["-m", "mpitrain", "bench", "allreduce", "-b", "4", "-e", "256K", "-f", "16",
                      "--iters", "3", "--warmup", "1", "--json", str(out)], timeout=60)
    assert res.returncode == 0, res.output
    assert "#wrong" in res.stdout and "Out of bounds values : 0 OK" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2
    algos = {r["algorithm"] for r in doc["results"]}
    assert algos == {"native", "ring", "recursive_doubling", "tree"}
    for r in doc["results"]:
        assert r["wrong"] == 0, r
        assert r["time_s"] > 0 and math.isfinite(r["busbw_GBps"])
        # P = 2: busbw == algbw; and no shared-memory allreduce moves 1 TB/s
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"])
        assert 0 < r["algbw_GBps"] < 1000
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
    sizes = sorted({r["bytes"] for r in doc["results"]})
    assert sizes[0] == 4 and sizes[-1] == 256 * 1024


def test_launch_with_n_and_float64(tmp_path):
    res = run([sys.executable, "-m", "mpitrain", "bench", "allreduce", "-n", "2", "-b", "8",
               "-e", "8K", "-f", "32", "--iters", "2", "--warmup", "0", "--dtype", "float64",
               "--algorithms", "ring,tree"], timeout=60)
    assert res.returncode == 0, res.output
    assert res.stdout.count("float64") >= 4 and "Out of bounds values : 0 OK" in res.stdout


def test_bad_algorithm_is_one_clear_error():
    res = mpiexec(2, ["-m", "mpitrain", "bench", "allreduce", "--algorithms", "ring,carrier-pigeon"],
                  timeout=60)
    assert res.returncode == 2
    assert res.stderr.count("mpitrain: error:") == 1 and "unknown carrier-pigeon" in res.stderr
    assert "Traceback" not in res.stderr


def test_fill_pattern_sums_are_exact():
    for dt in (np.float32, np.float64, np.int32):
        bufs = [fill_pattern(r, 1000, dt) for r in range(5)]
        assert np.abs(bufs[0]).max() <= 8
        assert (sum(b.astype(np.int64) for b in bufs) == expected_sum(5, 1000, np.int64)).all()
    assert sweep_sizes(4, 64 << 20, 4, 4)[-1] == 16 << 20  # elements of 64 MiB float32
    assert sweep_sizes(4, 64, 2, 8) == [1, 2, 4, 8]        # below one element: one element


def test_bench_train_runs_and_compares_overlap(tmp_path):
    out = tmp_path / "train.json"
    res = mpiexec(2, ["-m", "mpitrain", "bench", "train", "--steps", "6", "--warmup", "2",
                      "--compare-overlap", "--json", str(out)], timeout=90)
    assert res.returncode == 0, res.output
    rep = json.loads(out.read_text())
    for name in ("overlap_on", "overlap_off"):
        v = rep["variants"][name]
        assert v["steps"] == 6 and v["steps_per_s"] > 0 and v["samples_per_s"] > 0
        assert v["time_total_s"] >= v["time_wait_s"] >= 0
        assert v["samples_per_step"] == 64  # digits job: 32 per rank, 2 ranks
    # overlap on: the reductions start (communication) during backward; off: nothing is sent
    # before finish, so all of it is waiting
    assert rep["variants"]["overlap_on"]["time_comm_s"] > 0
    assert rep["variants"]["overlap_off"]["time_comm_s"] == 0
    assert "comm(ms)" in res.stdout
    assert rep["exposed_fraction"] >= 0 and "left on the critical path" in res.stdout


def test_summarize_steps_uses_medians_after_warmup():
    recs = [{"kind": "step", "step": i, "time_total": t, "time_wait": 0.1 * t,
             "time_comm": 0.2 * t, "time_compute": 0.7 * t, "samples": 10}
            for i, t in enumerate([9, 1, 2, 3, 100], 1)]
    s = summarize_steps(recs, warmup=1)
    assert s["steps"] == 4 and s["time_total_s"] == 2.5 and s["samples_per_s"] == 4.0
    assert s["time_comm_s"] == pytest.approx(0.5) and s["time_wait_s"] == pytest.approx(0.25)


# --------------------------------------------------------------------------- the cost model
P = sim.Params(alpha=5e-6, beta=1e-9, gamma=2e-10)


def test_ring_traffic_is_2_p_minus_1_over_p_n():
    n = 8 << 20
    for p in (2, 3, 4, 16, 4096):
        assert sim.traffic_per_rank("ring", p, n) == pytest.approx(2 * (p - 1) / p * n)
    for p in (2, 4, 16, 4096):  # Rabenseifner (powers of two): bandwidth-optimal as well
        assert sim.traffic_per_rank("native", p, n) == pytest.approx(2 * (p - 1) / p * n)
    assert sim.traffic_per_rank("tree", 8, n) == 3 * n            # the root: log2 P broadcasts
    assert sim.traffic_per_rank("recursive_doubling", 8, n) == 3 * n


def test_more_latency_less_bandwidth_more_loss_are_slower():
    sm = sim.StepModel([4e6, 4e6, 4e4], [1e8, 1e8, 1e6], gflops=50)
    for algo in sim.ALGORITHMS:
        for p in (2, 64, 4096):
            base = sm.step(algo, p, P)["step_s"]
            slow_lat = sm.step(algo, p, sim.Params(P.alpha * 10, P.beta, P.gamma))["step_s"]
            slow_bw = sm.step(algo, p, sim.Params(P.alpha, P.beta * 10, P.gamma))["step_s"]
            lossy = sm.step(algo, p, P, sim.Network(loss=1e-3))
            assert slow_lat > base and slow_bw > base and lossy["step_s"] > base
            assert lossy["traffic_bytes"] > sm.step(algo, p, P)["traffic_bytes"]
        # more ranks never make one allreduce cheaper
        ts = [sim.allreduce_time(algo, p, 1e6, P) for p in (2, 4, 8, 64, 4096)]
        assert ts == sorted(ts)
    # latency-bound small messages favour recursive doubling over ring at scale
    assert sim.allreduce_time("recursive_doubling", 1024, 64, P) < sim.allreduce_time("ring", 1024, 64, P)
    # overlap never hurts; a straggler hurts more with more ranks
    no = sim.StepModel(sm.layer_bytes, sm.layer_flops, 50, overlap=False)
    assert sm.step("ring", 8, P)["step_s"] <= no.step("ring", 8, P)["step_s"]
    st = sim.StepModel(sm.layer_bytes, sm.layer_flops, 50, straggler_s=1e-3, straggler_prob=0.01)
    assert st.step("ring", 4096, P)["straggler_s"] > st.step("ring", 4, P)["straggler_s"] > 0


def test_buckets_pay_latency_once_and_start_when_their_lowest_layer_is_ready():
    sm = sim.StepModel([4e6, 4e6, 4e4], [1e8, 1e8, 1e6], gflops=50)
    fused = sim.StepModel(sm.layer_bytes, sm.layer_flops, 50, bucket_bytes=1 << 20)  # 2 + 1
    latency_bound = sim.Params(1e-3, 0.0, 0.0)  # 1 ms per message, bandwidth free
    for algo in sim.ALGORITHMS:
        per_layer, two = sm.step(algo, 8, latency_bound), fused.step(algo, 8, latency_bound)
        assert two["comm_s"] == pytest.approx(per_layer["comm_s"] * 2 / 3, rel=1e-3)
        assert two["traffic_bytes"] == pytest.approx(per_layer["traffic_bytes"])
    # one bucket of everything can only start after the whole backward pass: no overlap left
    one = sim.StepModel(sm.layer_bytes, sm.layer_flops, 50, bucket_bytes=1 << 30)
    no = sim.StepModel(sm.layer_bytes, sm.layer_flops, 50, overlap=False, bucket_bytes=1 << 30)
    assert one.step("ring", 8, P)["step_s"] == pytest.approx(no.step("ring", 8, P)["step_s"])


def test_go_back_n_resends_the_window():
    f, timeouts = sim._loss_terms(64 * 4096, sim.Network(loss=0.01, mtu=4096, window=16))
    assert f == pytest.approx(1 + 16 * 0.01 / 0.99) and timeouts == pytest.approx(64 * 0.01 / 0.99)
    assert sim._loss_terms(1000, sim.Network(loss=0.0)) == (1.0, 0.0)


def test_calibration_recovers_known_alpha_beta():
    rng = np.random.default_rng(0)
    rows = []
    for algo in sim.ALGORITHMS:
        for p in (2, 4):
            for n in [4 * 4 ** k for k in range(13)]:
                t = sim.allreduce_time(algo, p, n, P) * (1 + 0.01 * rng.standard_normal())
                rows.append({"algorithm": algo, "ranks": p, "bytes": n, "time_s": t,
                             "reduce_s": P.gamma * n})
    assert cal.gamma_from_rows(rows) == pytest.approx(P.gamma)
    fitted = cal.calibrate(rows)
    for algo, prm in fitted.items():
        assert prm.alpha == pytest.approx(P.alpha, rel=0.05), algo
        assert prm.beta == pytest.approx(P.beta, rel=0.05), algo
    errs = cal.check(rows, fitted)
    assert max(e["median_rel_error"] for e in errs) < 0.03


def test_simulate_command(tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    rows = [{"algorithm": a, "ranks": 2, "bytes": n, "time_s": sim.allreduce_time(a, 2, n, P),
             "reduce_s": P.gamma * n} for a in sim.ALGORITHMS for n in (4, 4096, 1 << 20)]
    sweep.write_text(json.dumps({"ranks": 2, "results": rows}))
    out = tmp_path / "pred.json"
    code = mpitrain_main(["simulate", "--layers", "784,1024,1024,10", "--batch", "64",
                          "--dtype", "float32", "--calibrate", str(sweep), "--check", str(sweep),
                          "--ranks", "2,4096", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    assert code == 0
    rep = json.loads(out.read_text())
    assert len(rep["predictions"]) == 8 and rep["layer_bytes"][0] == (784 * 1024 + 1024) * 4
    assert max(c["median_rel_error"] for c in rep["check"]) < 1e-6
    assert "prediction error" in capsys.readouterr().out
    assert mpitrain_main(["simulate", "--layers", "10,x"]) == 2
