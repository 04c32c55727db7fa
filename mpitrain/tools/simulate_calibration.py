"""Calibration of the cost model of ``mpitrain simulate`` from measured allreduce sweeps.

``--calibrate bench.json ...`` (files written by ``mpitrain bench allreduce --json``): per
algorithm, alpha and beta by least squares on relative error, gamma fixed from the measured
local reduction (``reduce_s`` per size).  For every algorithm the beta and gamma terms are
proportional to n at any P, so the data alone cannot separate them; the local reduction
measurement does.  ``--check FILE ...`` compares predictions with measured sweeps (e.g.
calibrate at P = 2, check at P = 4).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .simulate_model import ALGORITHMS, Params, allreduce_time, coefficients


def load_sweeps(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable bench allreduce --json file ({exc})") from None
        for r in doc.get("results", []):
            if r.get("checksum") == "none":  # the model is of the default, checksummed transport
                continue
            rows.append({**r, "ranks": r.get("ranks", doc.get("ranks"))})
    if not rows:
        raise ConfigError(f"{', '.join(paths)}: no results in these files")
    return rows


def gamma_from_rows(rows: list[dict], min_bytes: int = 1 << 16) -> float | None:
    """Per-byte cost of the local reduction measured next to the sweep (median, big sizes)."""
    vals = [r["reduce_s"] / r["bytes"] for r in rows if r.get("reduce_s") and r["bytes"] >= min_bytes]
    return statistics.median(vals) if vals else None


def fit(rows: list[dict], algo: str, gamma: float | None = None) -> Params:
    """alpha, beta (and gamma if not given) minimising the relative error on ``rows``."""
    pts = [r for r in rows if r["algorithm"] == algo and r["ranks"] > 1]
    if len(pts) < 2:
        raise ConfigError(f"calibration: fewer than two {algo} points with more than one rank")
    X = np.array([coefficients(algo, r["ranks"], r["bytes"])[:3] for r in pts])
    t = np.array([r["time_s"] for r in pts])
    w = 1.0 / t                                  # relative error
    cols = [0, 1] if gamma is not None else [0, 1, 2]
    rhs = t - (X[:, 2] * gamma if gamma is not None else 0.0)
    coef = np.zeros(3)
    active = list(cols)
    while active:                                # tiny NNLS: drop negative terms, refit
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], rhs * w, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active = [c for c, s in zip(active, sol) if s > 0]
    return Params(coef[0], coef[1], gamma if gamma is not None else coef[2])


def calibrate(rows: list[dict], algos=ALGORITHMS) -> dict[str, Params]:
    gamma = gamma_from_rows(rows)
    return {a: fit(rows, a, gamma) for a in algos if any(r["algorithm"] == a for r in rows)}


def check(rows: list[dict], params: dict[str, Params]) -> list[dict]:
    """Per (algorithm, ranks): median and max relative prediction error over the sizes."""
    out: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for r in rows:
        a = r["algorithm"]
        if a not in params or r["ranks"] < 2:
            continue
        pred = allreduce_time(a, r["ranks"], r["bytes"], params[a])
        out.setdefault((a, r["ranks"]), []).append((r["bytes"], r["time_s"], pred))
    res = []
    for (a, p), pts in sorted(out.items()):
        err = [abs(pr - t) / t for _, t, pr in pts]
        big = [abs(pr - t) / t for n, t, pr in pts if n >= (1 << 20)]
        res.append({"algorithm": a, "ranks": p, "points": len(pts),
                    "median_rel_error": statistics.median(err), "max_rel_error": max(err),
                    "median_rel_error_1MiB_up": statistics.median(big) if big else None,
                    "points_detail": pts})
    return res
