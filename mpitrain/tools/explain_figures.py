"""Where the chapter's printed figures differ from its own rules, and why.

The second pass of the chapter (Figure 2-11) prints yb = 0.9982 and MSE = 0.0017; its rules
give other values.  :func:`second_iteration_check` tries the explanations: every subset of
the six updates left out (64 forward passes), the step size that would give the printed
figure, and the printed error against the printed output.
"""
from __future__ import annotations

import itertools

from .explain_chapter import CHAPTER, ETA, INITIAL, TARGET, WEIGHTS, second_pass_with


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



def second_iteration_check(v: dict) -> dict:
    """The search for the cause of the second-iteration gap, given the worked example's
    values ``v`` (``worked_example()["second_iteration_check"]``)."""
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
        "hypotheses": [{"name": name, **row} for name, row in named.items()],
        "subsets_tried": len(subsets),
        "subsets_reaching_chapter_yb": sum(abs(r["yb"] - yb_ch) < 5e-5 for r in subsets),
        "step_for_chapter_yb": step_for_output(v, yb_ch),
        "E_of_chapter_yb": 0.5 * (TARGET - yb_ch) ** 2,
        "y_minus_chapter_yb": TARGET - yb_ch,
        "chapter_E": E_ch,
    }
