"""``mpitrain explain``: the chapter's worked example and its two-GPU scenario, computed by
the harness's own model code.

The worked example is a two-neuron network (Figures 2-2 to 2-11 of the backprop chapter):

    neuron a:  za = x1*wa1 + x2*wa2 + x3*wa3 + ba0*wa0,   ya = ReLU(za)
    neuron b:  zb = ya*wb1 + bb0*wb0,                      yb = ReLU(zb)
    error:     E  = 0.5 * (y - yb)^2

In the harness that is ``MLP(3, [1, 1], activation="relu", output="relu", loss="mse")``:
layer 0 is neuron a (W = [wa1, wa2, wa3]^T, b = wa0) and layer 1 is neuron b (W = [wb1],
b = wb0).  A bias in the harness is exactly the chapter's weight on a constant input of 1.0
(ba0 = bb0 = 1.0).  Every number below comes from that model's ``forward``, ``loss`` and
``backward`` and from the harness's SGD optimizer; this module only arranges and labels them,
and says where the chapter's printed figures differ from what its own rules give.

The chapter's sign convention, worked out (the chapter states the rules without it):

* its "error term" of a neuron is dE/dz (delta_b = dE/dyb * f'(b) = -(y - yb) * 1 = -0.196),
  so error term * input = dE/dw, the gradient;
* it adds ``adjustment = eta * error term * input`` to each weight, with eta = -0.6, so
  w' = w + (-0.6) * dE/dw = w - 0.6 * dE/dw: plain gradient descent with learning rate 0.6,
  which is what the harness's ``sgd`` with ``lr = 0.6`` computes.  A positive eta would
  climb the error instead.

The scenario (``--scenario``) is one step of ``jobs/chapter/two_gpus.toml`` with two replicas in
one process, GPU-A (rank 0) and GPU-B (rank 1), each on its own half of one global batch, the
same shards and initial parameters as ``mpitrain run -n 2`` uses at step 1.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from .. import config, data
from ..errors import ConfigError, DataError
from ..model import MLP, activation_backward
from ..model import build as build_model
from ..optim import Optimizer, learning_rate

# --------------------------------------------------------------------------- the chapter's data
INPUTS = {"x1": 0.2, "x2": 0.1, "x3": 0.4}
BIAS_INPUT = 1.0        # ba0 and bb0: the constant input each bias weight multiplies
TARGET = 1.0            # y, the expected value
ETA = -0.6              # the chapter's learning rate, *added* times the error term
WEIGHTS = ("wa0", "wa1", "wa2", "wa3", "wb0", "wb1")
INITIAL = {"wa0": 0.6, "wa1": 0.1, "wa2": 0.2, "wa3": 0.3,
           # wb0 is not printed in the chapter; its zb = 0.804 = ya*wb1 + wb0 with ya = 0.76
           # and wb1 = 0.4 gives wb0 = 0.804 - 0.304 = 0.5.
           "wb0": 0.5, "wb1": 0.4}
WEIGHT_INPUT = {"wa0": "ba0", "wa1": "x1", "wa2": "x2", "wa3": "x3", "wb0": "bb0", "wb1": "ya"}

# The figures the chapter prints, as printed (the number of decimals says how it rounded).
CHAPTER = {"za": "0.76", "ya": "0.76", "zb": "0.804", "yb": "0.804", "E": "0.019",
           "f_prime_b": "1", "delta_b": "-0.196", "f_prime_a": "1", "delta_a": "-0.0784",
           "yb_2": "0.9982", "E_2": "0.0017"}

DEFAULT_JOB = Path(__file__).resolve().parents[2] / "jobs" / "chapter" / "two_gpus.toml"
RANK_NAMES = ("GPU-A", "GPU-B")


# --------------------------------------------------------------------------- the worked example
def chapter_model(weights: dict[str, float]) -> MLP:
    """The chapter's two neurons as a harness MLP holding ``weights`` (wa0..wb1)."""
    model = MLP(3, [1, 1], activation="relu", output="relu", loss="mse", dtype="float64")
    model.load_state({
        "layers.0.weight": [[weights["wa1"]], [weights["wa2"]], [weights["wa3"]]],
        "layers.0.bias": [weights["wa0"]],
        "layers.1.weight": [[weights["wb1"]]],
        "layers.1.bias": [weights["wb0"]],
    }, "the chapter's weights")
    return model


def model_weights(model: MLP) -> dict[str, float]:
    """The six chapter weights read back from the model's parameter buffers."""
    p0, p1 = model.params
    return {"wa0": float(p0.bias[0]), "wa1": float(p0.weight[0, 0]),
            "wa2": float(p0.weight[1, 0]), "wa3": float(p0.weight[2, 0]),
            "wb0": float(p1.bias[0]), "wb1": float(p1.weight[0, 0])}


def _sample() -> tuple[np.ndarray, np.ndarray]:
    """The chapter's one training example as a batch of one."""
    return np.array([[INPUTS["x1"], INPUTS["x2"], INPUTS["x3"]]]), np.array([[TARGET]])


def forward_pass(model: MLP) -> dict:
    """Run the model's forward and loss on the chapter's example.

    Returns za, ya, zb, yb, E and the harness's dL/dz of the output layer (``dz``, which is
    the chapter's error term of neuron b).  The weighted sums and activations are read from
    the model's own forward cache (the (z, a) pairs backward uses) rather than recomputed.
    """
    x, y = _sample()
    out = model.forward(x)
    (za, ya), (zb, yb) = model._cache[1], model._cache[2]
    # A batch of one: the mean over the batch is the chapter's single-example error.
    E, dz = model.loss(out, y, weight=1.0)
    return {"za": float(za[0, 0]), "ya": float(ya[0, 0]), "zb": float(zb[0, 0]),
            "yb": float(yb[0, 0]), "E": float(E), "dz": dz}


def first_iteration() -> tuple[dict, MLP]:
    """Forward, backward and the update of the chapter's first iteration.

    Returns every quantity the chapter names (keys as in ``--json``) and the updated model.
    """
    model = chapter_model(INITIAL)
    fwd = forward_pass(model)
    v = {k: fwd[k] for k in ("za", "ya", "zb", "yb", "E")}
    (_, (za, ya), (zb, yb)) = model._cache

    # The harness's loss fuses two chain-rule factors into dE/dzb; the chapter shows them
    # apart, so take them apart: dE/dyb from the error function, f'(b) from the harness's
    # activation derivative (its dL/dz for dL/da = 1), and check the product below.
    v["dE_dyb"] = -(TARGET - v["yb"])
    v["f_prime_b"] = float(activation_backward("relu", zb, yb, np.ones_like(zb), np)[0, 0])
    v["delta_b"] = float(fwd["dz"][0, 0])
    v["f_prime_a"] = float(activation_backward("relu", za, ya, np.ones_like(za), np)[0, 0])

    v["backward_order"] = list(model.backward(fwd["dz"]))
    # backward does not hand out hidden-layer error terms, but a bias multiplies the constant
    # input 1.0, so dE/dwa0 = delta_a * 1.0: the bias gradient is the error term itself.
    v["delta_a"] = float(model.grads[0].bias[0]) / BIAS_INPUT
    grads = {"wa0": model.grads[0].bias[0], "wa1": model.grads[0].weight[0, 0],
             "wa2": model.grads[0].weight[1, 0], "wa3": model.grads[0].weight[2, 0],
             "wb0": model.grads[1].bias[0], "wb1": model.grads[1].weight[0, 0]}
    for w in WEIGHTS:
        v[f"dE_d{w}"] = float(grads[w])
        v[f"adj_{w}"] = ETA * float(grads[w])    # the chapter: eta * error term * input

    # The update itself is the harness's SGD, w -= lr * g with lr = -eta = 0.6.
    sgd = Optimizer(config.OptimConfig(name="sgd", lr=-ETA), [p.flat for p in model.params])
    sgd.step([g.flat for g in model.grads], -ETA)
    for w, value in model_weights(model).items():
        v[f"new_{w}"] = value
    return v, model


def second_iteration(model: MLP) -> dict:
    """The forward pass with the updated weights (Figure 2-11)."""
    fwd = forward_pass(model)
    return {f"{k}_2": fwd[k] for k in ("za", "ya", "zb", "yb", "E")}


def second_pass_with(weights: dict[str, float]) -> tuple[float, float]:
    """(yb, E) of a forward pass of the harness model holding ``weights``."""
    fwd = forward_pass(chapter_model(weights))
    return fwd["yb"], fwd["E"]


def update_subsets(v: dict) -> list[dict]:
    """The second pass for every subset of the six updates (the rest keep their old value).

    If the chapter forgot or skipped some updates, one of these 64 would give its figure.
    """
    rows = []
    for mask in itertools.product((False, True), repeat=len(WEIGHTS)):
        updated = [w for w, on in zip(WEIGHTS, mask) if on]
        weights = {w: v[f"new_{w}"] if w in updated else INITIAL[w] for w in WEIGHTS}
        yb, E = second_pass_with(weights)
        rows.append({"updated": updated, "kept": [w for w in WEIGHTS if w not in updated],
                     "yb": yb, "E": E})
    return rows


def step_for_output(v: dict, target_yb: float) -> float:
    """The step size s (eta = -s) for which updating all six weights gives ``target_yb``.

    yb grows with s here (every gradient is negative and every input positive), so bisect.
    """
    lo, hi = 0.0, -ETA
    for _ in range(60):
        s = 0.5 * (lo + hi)
        weights = {w: INITIAL[w] - s * v[f"dE_d{w}"] for w in WEIGHTS}
        lo, hi = (s, hi) if second_pass_with(weights)[0] < target_yb else (lo, s)
    return 0.5 * (lo + hi)


def agrees(value: float, printed: str) -> bool:
    """True when ``value`` rounded to the printed figure's decimals is that figure."""
    decimals = len(printed.partition(".")[2])
    return round(value, decimals) == float(printed)


def worked_example() -> dict:
    """Everything ``mpitrain explain`` reports, as one JSON-ready dict.

    Top-level keys name the chapter's quantities (za ... E_2, dE_dw*, adj_w*, new_w*); the
    chapter's printed figures are under ``chapter``, value minus figure under
    ``differences``, and the search for the cause of the second-iteration gap under
    ``second_iteration_check``.
    """
    v, model = first_iteration()
    v.update(second_iteration(model))
    subsets = update_subsets(v)
    all_six = next(r for r in subsets if not r["kept"])
    closest = min(subsets, key=lambda r: abs(r["yb"] - float(CHAPTER["yb_2"])))
    named = {  # the hypotheses worth naming, looked up in the 64 rows
        "all six weights updated (the chapter's rules)": all_six,
        "wb0 kept (the second-pass text lists wa0..wa3 only; wb1 as in Figure 2-10)":
            next(r for r in subsets if r["kept"] == ["wb0"]),
        "both bias weights wa0 and wb0 kept":
            next(r for r in subsets if r["kept"] == ["wa0", "wb0"]),
        "the closest of all 64 subsets": closest,
    }
    yb_ch, E_ch = float(CHAPTER["yb_2"]), float(CHAPTER["E_2"])
    return {
        "model": 'MLP(3, [1, 1], activation="relu", output="relu", loss="mse", '
                 'dtype="float64")',
        "inputs": {**INPUTS, "ba0": BIAS_INPUT, "bb0": BIAS_INPUT},
        "y": TARGET, "eta": ETA, "initial": dict(INITIAL),
        **v,
        "sgd_lr": -ETA,
        "chapter": {k: float(s) for k, s in CHAPTER.items()},
        "differences": {k: v[k] - float(s) for k, s in CHAPTER.items()},
        "agrees": {k: agrees(v[k], s) for k, s in CHAPTER.items()},
        "second_iteration_check": {
            "hypotheses": [{"name": name, **row} for name, row in named.items()],
            "subsets_tried": len(subsets),
            "subsets_reaching_chapter_yb": sum(abs(r["yb"] - yb_ch) < 5e-5 for r in subsets),
            "step_for_chapter_yb": step_for_output(v, yb_ch),
            "E_of_chapter_yb": 0.5 * (TARGET - yb_ch) ** 2,
            "y_minus_chapter_yb": TARGET - yb_ch,
            "chapter_E": E_ch,
        },
    }


# --------------------------------------------------------------------------- text of the example
def num(x: float) -> str:
    """A number with 10 significant digits (float noise trimmed), a whole one as ``1.0``."""
    text = f"{x:.10g}"
    return text if any(c in text for c in ".en") else f"{text}.0"


def _line(symbol: str, formula: str, value: float, key: str | None, r: dict) -> str:
    """``  symbol = formula = value   [chapter FIGURE: same|same, rounded|DIFFERS]``."""
    text = f"  {symbol:<9}= {formula:<44} = {num(value)}"
    if key in CHAPTER:
        verdict = "same" if r["agrees"][key] else "DIFFERS"
        if r["agrees"][key] and not math.isclose(value, float(CHAPTER[key]), rel_tol=1e-12):
            verdict = "same, rounded"
        text = f"{text:<74} [chapter {CHAPTER[key]}: {verdict}]"
    return text


def format_example(r: dict) -> str:
    """The worked example as text, in the chapter's order and notation."""
    L = [
        "The chapter's worked example, computed by mpitrain's own model code",
        f"  {r['model']}",
        "  layer 0 = neuron a: W = [wa1, wa2, wa3]^T, bias = wa0 (the weight of input ba0 = 1.0)",
        "  layer 1 = neuron b: W = [wb1], bias = wb0 (the weight of input bb0 = 1.0)",
        "",
        "Inputs and initial weights",
        f"  x1 = {num(INPUTS['x1'])}   x2 = {num(INPUTS['x2'])}   x3 = {num(INPUTS['x3'])}"
        f"   ba0 = bb0 = {num(BIAS_INPUT)}   y = {num(TARGET)}   eta = {num(ETA)}",
        "  " + "   ".join(f"{w} = {num(INITIAL[w])}" for w in WEIGHTS),
        "  (wb0 is not printed in the chapter: zb = 0.804 = ya*wb1 + wb0 with ya = 0.76 and",
        "   wb1 = 0.4 gives wb0 = 0.5)",
        "",
        "First iteration: forward pass",
        _line("za", "x1*wa1 + x2*wa2 + x3*wa3 + ba0*wa0", r["za"], "za", r),
        _line("ya", "f(a) = ReLU(za)", r["ya"], "ya", r),
        _line("zb", "ya*wb1 + bb0*wb0", r["zb"], "zb", r),
        _line("yb", "f(b) = ReLU(zb)", r["yb"], "yb", r),
        _line("E", "0.5*(y - yb)^2", r["E"], "E", r),
        "",
        "Backward pass (the harness's backward yields layer "
        + ", then layer ".join(map(str, r["backward_order"])) + ": neuron b first)",
        _line("dE/dyb", "-(y - yb)", r["dE_dyb"], "dE_dyb", r),
        _line("f'(b)", "ReLU'(zb): 1 since zb > 0", r["f_prime_b"], "f_prime_b", r),
        _line("delta_b", "dE/dyb * f'(b)   (error term of b, dE/dzb)", r["delta_b"], "delta_b",
              r),
        _line("f'(a)", "ReLU'(za): 1 since za > 0", r["f_prime_a"], "f_prime_a", r),
        _line("delta_a", "delta_b * wb1 * f'(a)   (error term of a)", r["delta_a"], "delta_a",
              r),
        "",
        f"Weight adjustment values: adjustment = eta * error term * input, eta = {num(ETA)}",
    ]
    for w in ("wb0", "wb1", "wa0", "wa1", "wa2", "wa3"):
        term = "delta_b" if w.startswith("wb") else "delta_a"
        L.append(_line(f"adj({w})", f"eta * {term} * {WEIGHT_INPUT[w]} = eta * dE/d{w}",
                       r[f"adj_{w}"], None, r))
    L += ["", "New weights: w' = w + adjustment  (applied by the harness's SGD, w -= 0.6 * dE/dw)"]
    for w in ("wb0", "wb1", "wa0", "wa1", "wa2", "wa3"):
        L.append(_line(f"{w}'", f"{w} + adj({w}) = {num(INITIAL[w])} + {num(r[f'adj_{w}'])}",
                       r[f"new_{w}"], None, r))
    L += [
        "",
        "Second iteration: forward pass with the new weights",
        _line("za'", "x1*wa1' + x2*wa2' + x3*wa3' + ba0*wa0'", r["za_2"], None, r),
        _line("ya'", "ReLU(za')", r["ya_2"], None, r),
        _line("zb'", "ya'*wb1' + bb0*wb0'", r["zb_2"], None, r),
        _line("yb'", "ReLU(zb')", r["yb_2"], "yb_2", r),
        _line("E'", "0.5*(y - yb')^2", r["E_2"], "E_2", r),
        "",
    ]
    return "\n".join(L + format_notes(r))


def format_notes(r: dict) -> list[str]:
    """Why eta = -0.6 is gradient descent, and what the second-iteration gap is."""
    c = r["second_iteration_check"]
    L = [
        "Why adding eta = -0.6 is ordinary gradient descent",
        "  The chapter's error term is dE/dz: delta_b = dE/dyb * f'(b) = -(y - yb) * 1 = "
        f"{num(r['delta_b'])},",
        "  negative because a larger yb would lower the error.  Error term * input is therefore",
        "  dE/dw (e.g. dE/dwb1 = delta_b * ya = "
        f"{num(r['dE_dwb1'])}), and w' = w + eta * dE/dw with eta = -0.6",
        "  is w' = w - 0.6 * dE/dw: gradient descent with learning rate 0.6, exactly what",
        "  [optim] name = \"sgd\", lr = 0.6 does.  The chapter calls its negative rate \"not",
        "  recommended\"; with its signs it is in fact required: a positive eta would climb the",
        "  error (gradient ascent).  The harness keeps lr positive and subtracts instead.",
        "",
        "Where the chapter's figures differ from its rules",
        f"  E = {num(r['E'])} is printed as 0.019 (rounded; fine).",
        f"  Second pass: the rules give yb' = {num(r['yb_2'])} and E' = {num(r['E_2'])}; the",
        f"  chapter prints yb = {CHAPTER['yb_2']} and MSE = {CHAPTER['E_2']}.  Its rules overshoot "
        "the target",
        "  slightly (yb' > 1) yet still cut the error far below 0.019.  Tried, with this model:",
    ]
    for h in c["hypotheses"]:
        kept = ", ".join(h["kept"]) if h["kept"] else "none"
        L.append(f"    {h['name']}:")
        L.append(f"      kept {kept}: yb' = {num(h['yb'])}, E' = {num(h['E'])}")
    L += [
        f"  None of the {c['subsets_tried']} subsets of the six updates gives 0.9982 "
        f"({c['subsets_reaching_chapter_yb']} within 5e-5).",
        f"  Updating all six, yb' = 0.9982 needs a step of {c['step_for_chapter_yb']:.4f} "
        f"(eta = {-c['step_for_chapter_yb']:.4f}), not 0.6.",
        "  The two printed figures also disagree with each other: the chapter's own error",
        f"  0.5*(y - yb)^2 of yb = 0.9982 is {num(c['E_of_chapter_yb'])}, not 0.0017, while "
        f"y - yb = {num(c['y_minus_chapter_yb'])}",
        "  is close to 0.0017 (the same number if both were truncated from a yb near 0.99826):",
        "  the printed \"MSE\" looks like the unsquared difference y - yb.  So Figure 2-11 was",
        "  most likely computed from values other than the ones the text gives; mpitrain",
        "  follows the text's rules and prints both.",
    ]
    return L


# --------------------------------------------------------------------------- the two-GPU scenario
def two_gpu_step(job: str | Path = DEFAULT_JOB) -> dict:
    """One step of ``job`` with two replicas in one process, rank A and rank B.

    Each replica gets the shard ``mpitrain run -n 2`` gives that rank at step 1 and the same
    initial parameters; each runs forward, loss and backward, and the gradients each would
    hand to the allreduce are recorded per layer in the order backward yields them (last
    layer first).  Each rank weights its samples by 1/(global batch), as train.py does, so
    what it sends is its share of the mean and the allreduce's SUM is the average over the
    global batch; that is checked against one replica run on the whole global batch.
    """
    cfg = config.load(job)
    size = len(RANK_NAMES)
    dataset = data.load(cfg.data, cfg.run.seed)
    train_idx, _ = data.split(len(dataset.x), cfg.data.val_fraction, cfg.run.seed)
    samplers = [data.ShardSampler(train_idx, cfg.data.batch_size, rank, size, cfg.run.seed,
                                  cfg.data.shuffle, cfg.data.tail) for rank in range(size)]
    replicas = [_replica(cfg, dataset) for _ in range(size)]
    sends, order, losses, shards = [], None, [], []
    for sampler, model in zip(samplers, replicas):
        idx, n_global = sampler.shard(0, 0)
        if len(idx) == 0:
            raise DataError(f"{job}: the first global batch leaves a rank without samples",
                            hint="use more samples or a smaller [data] batch_size")
        x, y = dataset.batch(idx, model.dtype, np)
        grads, loss, order = _local_step(model, x, y, 1.0 / n_global)
        sends.append(grads)
        losses.append(loss)
        shards.append(idx)

    # What sync.finish leaves in every buffer: the allreduce's sum of the ranks' shares.
    average = {i: sends[0][i] + sends[1][i] for i in order}
    reference = _global_batch_gradients(dataset, np.concatenate(shards), replicas[0])
    layers = [_layer_report(replicas[0], i, [s[i] for s in sends], average[i]) for i in order]
    return {
        "job": str(job), "ranks": list(RANK_NAMES), "dtype": cfg.model.dtype,
        "sizes": replicas[0].sizes, "global_batch": int(sum(len(s) for s in shards)),
        "samples_per_rank": [len(s) for s in shards],
        "local_loss": losses, "global_loss": float(sum(losses)),
        "order": order, "layers": layers,
        "total_values": sum(l["values"] for l in layers),
        "total_bytes": {dt: sum(l["bytes"][dt] for l in layers) for dt in ("float32", "float64")},
        "max_abs_diff_vs_global_batch": max(float(np.abs(average[i] - reference[i]).max())
                                            for i in order),
        "backward_needs_only_local_error_terms": _backward_is_local(
            replicas[0], sends[0], dataset, shards[0], 1.0 / n_global),
        "params_after_step": _apply(cfg, replicas[0], average, samplers[0]),
    }


def _replica(cfg, dataset: data.Dataset) -> MLP:
    """A model replica built and initialised exactly as ``train.setup`` does."""
    return build_model(cfg.model, dataset.features, cfg.run.seed)


def _local_step(model: MLP, x, y, weight: float) -> tuple[dict, float, list[int]]:
    """Forward, loss and backward on one rank's shard.

    Each sample is weighted 1/n_global, as in train.py, so the sum over ranks is the mean
    over the global batch.  Returns {layer: flat gradients as
    handed to the allreduce}, the weighted loss sum, and the order the layers came in.
    """
    loss, dz = model.loss(model.forward(x), y, weight)
    grads, order = {}, []
    for i in model.backward(dz):
        grads[i] = model.grads[i].flat.copy()
        order.append(i)
    return grads, loss, order


def _global_batch_gradients(dataset, idx, like: MLP) -> dict:
    """The gradients of ONE replica on the whole global batch: what the average must equal."""
    model = _clone(like)
    x, y = dataset.batch(idx, model.dtype, np)
    return _local_step(model, x, y, 1.0 / len(idx))[0]


def _backward_is_local(model: MLP, sent: dict, dataset, idx, weight: float) -> bool:
    """Does layer k-1's backward need layer k's (averaged) gradient?  Find out.

    Re-run rank A's backward and, the moment each layer is yielded, overwrite its gradient
    buffer with NaN -- as if the average had not arrived yet.  If every earlier layer still
    gets the same gradients, backward only used the local error term and the weights, which
    is why a layer's allreduce can overlap the backward pass of the layers before it.
    """
    probe = _clone(model)
    x, y = dataset.batch(idx, probe.dtype, np)
    _, dz = probe.loss(probe.forward(x), y, weight)
    same = True
    for i in probe.backward(dz):
        same &= bool(np.array_equal(probe.grads[i].flat, sent[i]))
        probe.grads[i].flat[...] = np.nan
    return same


def _layer_report(model: MLP, i: int, sent: list, average) -> dict:
    """One layer's line of the scenario: shapes, values, bytes, what is sent and the mean."""
    fan_in, fan_out = model.sizes[i], model.sizes[i + 1]
    n = fan_in * fan_out + fan_out

    def split(flat) -> dict:
        return {"weight": flat[:fan_in * fan_out].reshape(fan_in, fan_out).tolist(),
                "bias": flat[fan_in * fan_out:].tolist()}

    return {"layer": i, "weight_shape": [fan_in, fan_out], "bias_shape": [fan_out],
            "values": n, "bytes": {"float32": 4 * n, "float64": 8 * n},
            "sent": {name: split(s) for name, s in zip(RANK_NAMES, sent)},
            "average": split(average)}


def _apply(cfg, model: MLP, average: dict, sampler: data.ShardSampler) -> dict:
    """Parameters after step 1: the job's optimizer on the averaged gradients."""
    model = _clone(model)
    total = cfg.run.steps or (cfg.run.epochs or 10) * sampler.steps_per_epoch
    optim = Optimizer(cfg.optim, [p.flat for p in model.params], np)
    optim.step([average[i] for i in range(model.n_layers)], learning_rate(cfg.optim, 1, total))
    return {k: v.tolist() for k, v in model.state().items()}


def _clone(model: MLP) -> MLP:
    """A separate replica with the same architecture and parameters."""
    copy = MLP(model.sizes[0], model.sizes[1:], model.activations[0], model.activations[-1],
               model.loss_name, model.dtype, np)
    copy.load_state(model.state(), "the scenario's replica")
    return copy


def format_scenario(s: dict) -> str:
    """The scenario as text: per layer, last first, what each GPU sends and the average."""
    arch = " -> ".join(map(str, s["sizes"]))
    L = [
        f"One step of the chapter's two-GPU scenario ({_shown(s['job'])})",
        f"  model {arch} (two hidden layers of four neurons, one output), dtype {s['dtype']}",
        f"  global batch {s['global_batch']}: GPU-A (rank 0) takes {s['samples_per_rank'][0]}"
        f" samples, GPU-B (rank 1) the other {s['samples_per_rank'][1]}",
        f"  loss over the global batch {s['global_loss']:.6f} (GPU-A's half contributes "
        f"{s['local_loss'][0]:.6f}, GPU-B's {s['local_loss'][1]:.6f})",
        "",
        "Backward pass, layer by layer as it produces them (last layer first); each layer's",
        "gradients go into one allreduce as soon as they exist.  Each GPU weights its samples",
        f"by 1/{s['global_batch']} (the global batch), so it sends its share of the mean and the",
        "allreduce's sum is the average over the global batch -- the chapter's average of the",
        "two GPUs' gradients, without a separate division:",
    ]
    for l in s["layers"]:
        fi, fo = l["weight_shape"]
        L.append("")
        L.append(f"layer {l['layer']} ({fi} -> {fo}): dW {fi}x{fo} + db {fo} = {l['values']} "
                 f"gradients = {l['bytes']['float32']} B as float32, "
                 f"{l['bytes']['float64']} B as float64, per rank")
        for who, g in [*l["sent"].items(), ("average", l["average"])]:
            label = f"{who} sends" if who != "average" else "sum = average"
            if fo == 1:  # one output neuron: its weight column reads better as a row
                L.append(f"  {label:<18} dW^T = {_fmt_row(w[0] for w in g['weight'])}")
                L.append(f"  {'':<18} db   = {_fmt_row(g['bias'])}")
            else:
                L += _matrix(f"  {label:<18} dW", g["weight"])
                L.append(f"  {'':<18} db = {_fmt_row(g['bias'])}")
    t = s["total_bytes"]
    L += [
        "",
        f"Per step each rank contributes {s['total_values']} gradients: {t['float32']} B as "
        f"float32, {t['float64']} B as float64",
        "  (the payload of the three allreduces; a ring allreduce on p ranks sends 2(p-1)/p",
        "  of it per rank, so at p = 2 each GPU sends its payload once and receives it once).",
        f"The average equals the gradient of one replica on the whole global batch: max |diff|"
        f" = {s['max_abs_diff_vs_global_batch']:.3g}",
        "",
        "What waits for what",
        "  GPU-A's backward for layer k-1 uses its LOCAL error term of layer k and the weights",
        "  of layer k (identical on both ranks), never the averaged gradient of layer k.  Check:",
        "  re-running GPU-A's backward with each layer's gradient buffer overwritten by NaN as",
        "  soon as it is yielded gives the same gradients for every earlier layer: "
        f"{s['backward_needs_only_local_error_terms']}.",
        "  So layer k's allreduce can run while backward computes layer k-1 ([sync] overlap).",
        "  The averages are needed only for the weight update.  That is what the chapter's",
        "  \"the neurons in the preceding layer cannot calculate their gradient\" is about: the",
        "  synchronized step as a whole.  Without every layer's average no replica can apply",
        "  the update, and a replica that applied a different one would drift from the others.",
    ]
    return "\n".join(L)


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    p = Path(path).resolve()
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def _fmt_row(values) -> str:
    return "[" + " ".join(f"{v:+.4f}" for v in values) + "]"


def _matrix(prefix: str, rows) -> list[str]:
    pad = " " * len(prefix)
    return [f"{prefix if k == 0 else pad} {'=' if k == 0 else ' '} {_fmt_row(row)}"
            for k, row in enumerate(rows)]


# --------------------------------------------------------------------------- entry point
def main(json_output: bool = False, scenario: bool | str = False) -> int:
    """Print the worked example (or, with ``scenario``, the two-GPU step) as text or JSON.

    ``scenario`` is False (the worked example), True (the chapter's job file,
    jobs/chapter/two_gpus.toml) or the path of another job file.
    """
    if scenario:
        job = DEFAULT_JOB if scenario is True else Path(scenario)
        if not job.exists():
            raise ConfigError(f"job file {job} does not exist",
                              hint="pass a job file: mpitrain explain --scenario JOB.toml")
        result = two_gpu_step(job)
        print(json.dumps(result, indent=1) if json_output else format_scenario(result))
        return 0
    result = worked_example()
    print(json.dumps(result, indent=1) if json_output else format_example(result))
    return 0
