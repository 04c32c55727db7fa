"""What the injected message faults did to a run that finished: no hit goes unmentioned.

Each message fault a sender carried out (``FaultMechanics.effects``) is put in one class,
with the messages receivers counted absent (``Transport.lost``) and the steps at which a
check warned (``on_divergence = "warn"``):

changed nothing   a duplicate or a reorder (the sequence numbers restore the order), or a
                  delay that arrived within the deadline
survived          reliable delivery resent a dropped, corrupted or late message
reported          it changed the results, and a check warned at its step
below tolerance   it changed the results and no check saw it: a message counted absent
                  whose share summed to almost nothing, or a corruption smaller than the
                  end-to-end check's floating-point tolerance (its size is given)

The summary is one line for the user and one ``fault_outcome`` event in events.jsonl.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mpitrain.comm.wire import MessageId

if TYPE_CHECKING:  # not at run time: it imports mpi4py.MPI (MPI_Init)
    from mpitrain.comm.guarded import GuardedComm

CLASSES = ("changed nothing", "survived", "reported", "below tolerance")


def gather(guard: GuardedComm, transport: Any, check: str, step: int) -> list[dict] | None:
    """Collective: every rank's fault effects and losses, on rank 0 (None elsewhere).
    ``guard``: the guarded collectives (``check`` and ``step`` name this one in the error
    if a rank does not arrive)."""
    mine = {"effects": list(transport.faults.effects) if transport is not None else [],
            "lost": [tuple(m) for m in transport.lost] if transport is not None else []}
    return guard.gather(mine, check, step)


def classify(rows: list[dict], delivery: str, warned_steps: set[int]) -> dict[str, list[dict]]:
    """Every effect of ``rows`` (from :func:`gather`) in its class (see the module)."""
    lost = {tuple(m) for row in rows for m in row["lost"]}
    out: dict[str, list[dict]] = {c: [] for c in CLASSES}
    faulted = {tuple(e["mid"]) for row in rows for e in row["effects"]}
    out["late"] = [{"kind": "late", "mid": m} for m in sorted(lost - faulted)]
    for row in rows:
        for effect in row["effects"]:
            mid = tuple(effect["mid"])
            harmless = effect["kind"] in ("duplicate", "reorder") or \
                (effect["kind"] == "delay" and mid not in lost)
            if harmless:
                out["changed nothing"].append(effect)
            elif delivery == "reliable":
                out["survived"].append(effect)
            elif mid[0] in warned_steps:
                out["reported"].append(effect)
            else:
                out["below tolerance"].append(effect)
    return out


def summary(classes: dict[str, list[dict]], delivery: str) -> str | None:
    """The line for the user (None when no fault touched a message)."""
    total = sum(len(classes[c]) for c in CLASSES)
    late = classes.get("late", [])
    if not total and not late:
        return None
    parts = []
    if late:
        parts.append(f"{len(late)} message(s) counted absent without a fault on them, late "
                     f"beyond the deadline ({'; '.join(_where(e) for e in late[:3])})")
    for name in CLASSES:
        effects = classes[name]
        if not effects:
            continue
        kinds: dict[str, int] = {}
        for e in effects:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        counted = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        if name == "below tolerance":
            parts.append(f"{len(effects)} changed the results below the checks' tolerance "
                         f"({'; '.join(_where(e) for e in effects[:3])}"
                         f"{'; ...' if len(effects) > 3 else ''})")
        else:
            parts.append(f"{len(effects)} {name} ({counted})")
    return (f"faults: {total} injected into messages ({delivery} delivery): "
            + "; ".join(parts[1:] + parts[:1] if late else parts))


def _where(effect: dict) -> str:
    mid = MessageId(*effect["mid"])
    change = effect.get("change")
    size = f", largest change {change:.3g}" if change is not None else ""
    return f"{effect['kind']} at {mid.where()}{size}"
