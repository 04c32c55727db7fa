"""`mpitrain explain` against independent arithmetic, and the chapter's two-GPU job.

The expected numbers are worked out below in plain Python floats from the chapter's
inputs and rules -- no NumPy, no harness code -- and compared with what explain prints
(text, parsed) and returns (--json).
"""
import json
import math
import re
import sys

import numpy as np
import pytest

from mpirun import REPO, mpitrain, run

from mpitrain.tools import explain
from mpitrain.tools.explain_scenario import two_gpu_step

JOB = "jobs/chapter/two_gpus.toml"

# --------------------------------------------------------------------------- the chapter, by hand
X1, X2, X3, BA0, BB0, Y, ETA = 0.2, 0.1, 0.4, 1.0, 1.0, 1.0, -0.6
W0 = {"wa0": 0.6, "wa1": 0.1, "wa2": 0.2, "wa3": 0.3, "wb0": 0.5, "wb1": 0.4}


def relu(z):
    return z if z > 0 else 0.0


def relu_prime(z):
    return 1.0 if z > 0 else 0.0


def forward(w):
    za = X1 * w["wa1"] + X2 * w["wa2"] + X3 * w["wa3"] + BA0 * w["wa0"]
    ya = relu(za)
    zb = ya * w["wb1"] + BB0 * w["wb0"]
    yb = relu(zb)
    return za, ya, zb, yb, 0.5 * (Y - yb) ** 2


def expected():
    """Every quantity of the worked example under explain's --json keys."""
    za, ya, zb, yb, E = forward(W0)
    e = {"za": za, "ya": ya, "zb": zb, "yb": yb, "E": E}
    e["dE_dyb"] = -(Y - yb)
    e["f_prime_b"] = relu_prime(zb)
    e["delta_b"] = e["dE_dyb"] * e["f_prime_b"]
    e["f_prime_a"] = relu_prime(za)
    e["delta_a"] = e["delta_b"] * W0["wb1"] * e["f_prime_a"]
    inputs = {"wa0": BA0, "wa1": X1, "wa2": X2, "wa3": X3, "wb0": BB0, "wb1": ya}
    new = {}
    for w, inp in inputs.items():
        term = e["delta_b"] if w.startswith("wb") else e["delta_a"]
        e[f"dE_d{w}"] = term * inp
        e[f"adj_{w}"] = ETA * term * inp
        new[w] = e[f"new_{w}"] = W0[w] + e[f"adj_{w}"]
    for k, v in zip(("za_2", "ya_2", "zb_2", "yb_2", "E_2"), forward(new)):
        e[k] = v
    return e, new


EXPECTED, NEW = expected()

# The chapter's printed figures, and whether its rules reproduce them.
CHAPTER = {"za": 0.76, "ya": 0.76, "zb": 0.804, "yb": 0.804, "E": 0.019, "f_prime_b": 1.0,
           "delta_b": -0.196, "f_prime_a": 1.0, "delta_a": -0.0784, "yb_2": 0.9982,
           "E_2": 0.0017}
DIFFERS = {"yb_2", "E_2"}

# Text symbol -> --json key, in the order the chapter names them.
SYMBOLS = {"za": "za", "ya": "ya", "zb": "zb", "yb": "yb", "E": "E", "dE/dyb": "dE_dyb",
           "f'(b)": "f_prime_b", "delta_b": "delta_b", "f'(a)": "f_prime_a",
           "delta_a": "delta_a",
           **{f"adj({w})": f"adj_{w}" for w in ("wb0", "wb1", "wa0", "wa1", "wa2", "wa3")},
           **{f"{w}'": f"new_{w}" for w in ("wb0", "wb1", "wa0", "wa1", "wa2", "wa3")},
           "za'": "za_2", "ya'": "ya_2", "zb'": "zb_2", "yb'": "yb_2", "E'": "E_2"}
LINE = re.compile(r"^  (?P<sym>\S+)\s*= .* = (?P<val>\S+)\s*"
                  r"(?:\[chapter (?P<fig>\S+): (?P<verdict>[^\]]+)\])?$")


def test_hand_arithmetic_matches_the_chapter_text():
    """The test's own arithmetic reproduces what the chapter says it gets (a sanity check)."""
    e = EXPECTED
    assert (e["za"], e["zb"]) == pytest.approx((0.76, 0.804))
    assert round(e["E"], 3) == 0.019
    assert (e["delta_b"], e["delta_a"]) == pytest.approx((-0.196, -0.0784))
    # eta = -0.6 added times the error term is gradient descent with step 0.6
    for w in W0:
        assert NEW[w] == pytest.approx(W0[w] - 0.6 * e[f"dE_d{w}"], rel=1e-15)


# --------------------------------------------------------------------------- text output
def parse_text(text: str) -> dict:
    found = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m["sym"] in SYMBOLS:
            key = SYMBOLS[m["sym"]]
            assert key not in found, f"{m['sym']} printed twice"
            found[key] = (float(m["val"]), m["fig"], m["verdict"])
    return found


@pytest.fixture(scope="module")
def text_output():
    res = run([sys.executable, "-m", "mpitrain", "explain"], timeout=60)
    assert res.returncode == 0, res.output
    return res.stdout


@pytest.fixture(scope="module")
def json_output():
    res = run([sys.executable, "-m", "mpitrain", "explain", "--json"], timeout=60)
    assert res.returncode == 0, res.output
    return json.loads(res.stdout)


def test_text_prints_every_quantity_in_the_chapters_order(text_output):
    found = parse_text(text_output)
    assert list(found) == list(SYMBOLS.values())


def test_text_numbers_match_independent_arithmetic(text_output):
    for key, (value, _, _) in parse_text(text_output).items():
        # ten significant digits are printed
        assert value == pytest.approx(EXPECTED[key], rel=1e-9, abs=1e-12), key


def test_text_compares_with_the_chapters_figures(text_output):
    found = parse_text(text_output)
    for key, figure in CHAPTER.items():
        _, printed, verdict = found[key]
        assert float(printed) == figure, key
        assert verdict.startswith("DIFFERS" if key in DIFFERS else "same"), (key, verdict)
    assert found["E"][2] == "same, rounded"
    # the explanation of the signs and of the second-iteration gap are part of the output
    assert "w' = w - 0.6 * dE/dw" in text_output
    assert "gradient descent with learning rate 0.6" in text_output
    assert "None of the 64 subsets" in text_output


# --------------------------------------------------------------------------- --json output
def test_json_values_match_independent_arithmetic(json_output):
    for key, value in EXPECTED.items():
        assert json_output[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert json_output["backward_order"] == [1, 0]
    assert json_output["eta"] == ETA and json_output["sgd_lr"] == 0.6
    assert json_output["initial"] == W0


def test_json_chapter_figures_and_differences(json_output):
    assert json_output["chapter"] == CHAPTER
    for key, figure in CHAPTER.items():
        assert json_output["differences"][key] == pytest.approx(EXPECTED[key] - figure,
                                                                abs=1e-12), key
        assert json_output["agrees"][key] is (key not in DIFFERS), key


def test_json_second_iteration_check(json_output):
    c = json_output["second_iteration_check"]
    by_kept = {tuple(h["kept"]): h for h in c["hypotheses"]}
    for kept in [(), ("wb0",), ("wa0", "wb0")]:
        weights = {w: W0[w] if w in kept else NEW[w] for w in W0}
        _, _, _, yb, E = forward(weights)
        assert (by_kept[kept]["yb"], by_kept[kept]["E"]) == pytest.approx((yb, E), rel=1e-12)
    # the closest subset, found by brute force here too
    best = min((abs(forward({w: NEW[w] if m >> i & 1 else W0[w] for i, w in enumerate(W0)})[3]
                    - 0.9982), m) for m in range(64))
    assert abs(c["hypotheses"][-1]["yb"] - 0.9982) == pytest.approx(best[0], rel=1e-9)
    assert best[0] > 1e-3 and c["subsets_tried"] == 64 and c["subsets_reaching_chapter_yb"] == 0
    # all six updated with step s: yb(s) = wb0(s) + wb1(s) * za(s), a quadratic in s
    gb0, gb1 = EXPECTED["dE_dwb0"], EXPECTED["dE_dwb1"]
    gza = sum(EXPECTED[f"dE_d{w}"] * x for w, x in
              (("wa0", BA0), ("wa1", X1), ("wa2", X2), ("wa3", X3)))
    a, b = gb1 * gza, -gb0 - W0["wb1"] * gza - gb1 * EXPECTED["za"]
    c0 = W0["wb0"] + W0["wb1"] * EXPECTED["za"] - 0.9982
    s = (-b + math.sqrt(b * b - 4 * a * c0)) / (2 * a)
    assert c["step_for_chapter_yb"] == pytest.approx(s, rel=1e-9)
    assert c["E_of_chapter_yb"] == pytest.approx(0.5 * 0.0018 ** 2, rel=1e-9)


# --------------------------------------------------------------------------- the scenario
def test_scenario_bytes_and_order_per_layer():
    s = two_gpu_step(REPO / JOB)
    assert s["order"] == [2, 1, 0] and [l["layer"] for l in s["layers"]] == [2, 1, 0]
    # (fan_in * fan_out + fan_out) values of 4 or 8 bytes
    assert [l["values"] for l in s["layers"]] == [4 * 1 + 1, 4 * 4 + 4, 4 * 4 + 4]
    assert [l["bytes"] for l in s["layers"]] == [
        {"float32": 20, "float64": 40}, {"float32": 80, "float64": 160},
        {"float32": 80, "float64": 160}]
    assert s["total_bytes"] == {"float32": 180, "float64": 360}
    assert s["samples_per_rank"] == [16, 16] and s["global_batch"] == 32


def test_scenario_average_is_the_sum_of_what_both_ranks_send():
    """Each rank sends its share of the mean (its samples weighted 1/global batch), so the
    allreduce's sum is the average; the global-batch check below pins the scale."""
    s = two_gpu_step(REPO / JOB)
    for l in s["layers"]:
        for part in ("weight", "bias"):
            a, b = (np.array(l["sent"][r][part]) for r in ("GPU-A", "GPU-B"))
            assert not np.array_equal(a, b)  # different halves of the batch
            np.testing.assert_allclose(l["average"][part], a + b, rtol=1e-6, atol=1e-7)
    assert s["max_abs_diff_vs_global_batch"] < 1e-6
    assert s["backward_needs_only_local_error_terms"] is True


def test_scenario_text(capsys):
    assert explain.main(scenario=str(REPO / JOB)) == 0
    text = capsys.readouterr().out
    layers = re.findall(r"^layer (\d) \((\d) -> (\d)\): .* = (\d+) B as float32, (\d+) B as "
                        r"float64, per rank$", text, re.M)
    assert layers == [("2", "4", "1", "20", "40"), ("1", "4", "4", "80", "160"),
                      ("0", "4", "4", "80", "160")]
    assert "180 B as float32, 360 B as float64" in text
    assert "GPU-A sends" in text and "GPU-B sends" in text and "sum = average" in text
    assert "gives the same gradients for every earlier layer: True" in text


def test_scenario_command_line():
    res = run([sys.executable, "-m", "mpitrain", "explain", "--scenario", "--json"], timeout=60)
    assert res.returncode == 0, res.output
    assert json.loads(res.stdout)["total_bytes"] == {"float32": 180, "float64": 360}


# --------------------------------------------------------------------------- the job on 2 ranks
def test_two_gpus_job_runs_on_two_ranks(tmp_path):
    res = mpitrain(2, ["run", JOB, "--set", f"run.out={tmp_path}"], timeout=120)
    assert res.returncode == 0, res.output
    with np.load(tmp_path / "model.npz") as z:
        shapes = {k: z[k].shape for k in z.files}
    assert shapes == {"layers.0.weight": (4, 4), "layers.0.bias": (4,),
                      "layers.1.weight": (4, 4), "layers.1.bias": (4,),
                      "layers.2.weight": (4, 1), "layers.2.bias": (1,)}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(r["samples"] == 32 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_scenario_is_step_one_of_the_real_run(tmp_path):
    """explain's two in-process replicas end step 1 with the parameters of the 2-rank run."""
    res = mpitrain(2, ["run", JOB, "--set", "run.steps=1", "--set", f"run.out={tmp_path}"],
                   timeout=120)
    assert res.returncode == 0, res.output
    after = two_gpu_step(REPO / JOB)["params_after_step"]
    with np.load(tmp_path / "model.npz") as z:
        for k in z.files:
            np.testing.assert_allclose(z[k], after[k], rtol=0, atol=1e-7, err_msg=k)
