"""The chapter's worked example, computed by the harness's own model code.

The worked example is a two-neuron network (Figures 2-2 to 2-11 of the backprop chapter):

    neuron a:  za = x1*wa1 + x2*wa2 + x3*wa3 + ba0*wa0,   ya = ReLU(za)
    neuron b:  zb = ya*wb1 + bb0*wb0,                      yb = ReLU(zb)
    error:     E  = 0.5 * (y - yb)^2

In the harness that is ``MLP(3, [1, 1], activation="relu", output="relu", loss="mse")``:
layer 0 is neuron a (W = [wa1, wa2, wa3]^T, b = wa0) and layer 1 is neuron b (W = [wb1],
b = wb0).  A bias in the harness is exactly the chapter's weight on a constant input of 1.0
(ba0 = bb0 = 1.0).  Every number below comes from that model's ``forward``, ``loss`` and
``backward`` and from the harness's SGD optimizer; this module only arranges and labels them.

The chapter's sign convention, worked out (the chapter states the rules without it):

* its "error term" of a neuron is dE/dz (delta_b = dE/dyb * f'(b) = -(y - yb) * 1 = -0.196),
  so error term * input = dE/dw, the gradient;
* it adds ``adjustment = eta * error term * input`` to each weight, with eta = -0.6, so
  w' = w + (-0.6) * dE/dw = w - 0.6 * dE/dw: plain gradient descent with learning rate 0.6,
  which is what the harness's ``sgd`` with ``lr = 0.6`` computes.  A positive eta would
  climb the error instead.
"""
from __future__ import annotations

import numpy as np

from .. import config
from ..model import MLP, activation_backward
from ..optim import Optimizer

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
    (za, ya), (zb, yb) = model.layer_values(0), model.layer_values(1)
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
    (za, ya), (zb, yb) = model.layer_values(0), model.layer_values(1)

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

