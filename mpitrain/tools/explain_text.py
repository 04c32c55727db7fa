"""The worked example as text, in the chapter's order and notation (``mpitrain explain``)."""
from __future__ import annotations

import math

from .explain_chapter import (BIAS_INPUT, CHAPTER, ETA, INITIAL, INPUTS, TARGET, WEIGHT_INPUT,
                              WEIGHTS)


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

