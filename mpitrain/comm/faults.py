"""Fault plans and the fault injector.

A :class:`FaultPlan` is a list of :class:`FaultRule` plus a seed.  A
:class:`FaultInjector` (one per rank) applies the plan *at the sender*, inside
:class:`mpitrain.comm.transport.Transport`, which is the one place every
point-to-point message of the harness passes.  Native ``MPI.Iallreduce`` cannot
be intercepted message by message, so message faults (drop, delay, corrupt,
duplicate, reorder) only act on the harness's own algorithms (ring, recursive
doubling, tree).  The per-collective faults ``crash`` and ``slow`` act at the
start of a collective and therefore work with every algorithm, native included.

Replayability: whether rule *i* hits message *m* is decided by a hash of
``(seed, i, m)`` -- not by a shared random stream -- so the decision does not
depend on the order of calls or on timing.  ``count`` limits the hits of a rule
per *sending* rank; each rank sends its messages in a fixed program order, so
counted rules replay too.  The first rule (in plan order) that hits a message
decides its fault; later rules are not consulted for that message.

Faults hit the *first* transmission of a message only; retransmissions in
reliable mode travel clean (otherwise a ``probability = 1`` drop could never
be recovered from).  Control traffic (acknowledgements, error reports, fault
notices) is never faulted.

Every injected fault is reported as an event dict (see :func:`fault_event`)
through the ``events`` callback.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from mpitrain.schema import COLLECTIVE_KINDS, MESSAGE_KINDS, FaultRule



@dataclass(frozen=True)
class FaultPlan:
    """The rules and the seed; identical on every rank.  Rules may be given as
    :class:`~mpitrain.schema.FaultRule` or as tables of keys (validated like a job file's)."""

    rules: tuple[FaultRule, ...] = ()
    seed: int = 0

    def __init__(self, rules: Iterable[FaultRule | Mapping[str, Any]] = (), seed: int = 0):
        built = tuple(r if isinstance(r, FaultRule) else FaultRule.from_dict(r) for r in rules)
        object.__setattr__(self, "rules", built)
        object.__setattr__(self, "seed", int(seed))


class Hit(NamedTuple):
    """A fault decided for one message: the rule and two hash-derived numbers."""

    rule_index: int
    rule: FaultRule
    u: float          # uniform in [0, 1): the draw that decided the hit
    pick: int         # 64-bit value used to choose e.g. the bit to flip
    event: dict       # the logged fault event (see fault_event)


def _draw(seed: int, index: int, key: tuple) -> tuple[float, int]:
    """Deterministic (u, pick) for (seed, rule index, message key)."""
    h = hashlib.blake2b(repr((seed, index) + tuple(key)).encode(), digest_size=16).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64, int.from_bytes(h[8:], "little")


def fault_event(kind: str, mid: Any = None, **extra: Any) -> dict[str, Any]:
    """The event dict for an injected fault.

    Keys: ``event`` ("fault"), ``kind``, ``step``, ``layer``, ``algorithm``,
    ``phase``, ``chunk``, ``src``, ``dst`` (from the MessageId; None for
    collective faults where not applicable), ``t`` (time.time()), plus extras
    such as ``rule``, ``rank``, ``delay_ms``, ``corrupt``, ``detail``.
    """
    ev: dict[str, Any] = {"event": "fault", "kind": kind}
    for name in ("step", "layer", "algorithm", "phase", "chunk", "src", "dst"):
        ev[name] = getattr(mid, name, None) if mid is not None else extra.pop(name, None)
    ev.update(extra)
    ev["t"] = time.time()
    return ev


class FaultInjector:
    """Applies a :class:`FaultPlan` on one rank (the sender of the messages).

    ``events`` is a callable receiving each event dict, or a list to append to.
    The transport calls :meth:`message_fault` for every message this rank sends
    (first transmission only) and :meth:`collective_faults` at the start of
    every collective.  ``crashed``: indices of "crash" rules that already killed this
    rank earlier in the same run (before a resume): a rank dies of a rule once.
    """

    def __init__(self, plan: FaultPlan, rank: int,
                 events: Callable[[dict], None] | list | None = None,
                 crashed: Iterable[int] = ()):
        self.plan = plan
        self.rank = rank
        self.emit = events.append if isinstance(events, list) else events
        self._hits = [0] * len(plan.rules)
        for i in crashed:  # crash rules that killed this rank earlier in the run
            self._hits[i] = 1
        # Pre-split the rules so an empty plan (or one with only collective
        # faults) costs one truthiness test per message.
        self._message_rules = [(i, r) for i, r in enumerate(plan.rules) if r.kind in MESSAGE_KINDS]
        self._collective_rules = [(i, r) for i, r in enumerate(plan.rules)
                                  if r.kind in COLLECTIVE_KINDS and r.target_rank == rank]

    def log(self, ev: dict[str, Any]) -> None:
        if self.emit is not None:
            self.emit(ev)

    def _take(self, i: int, rule: FaultRule, key: tuple) -> tuple[float, int] | None:
        if rule.count is not None and self._hits[i] >= rule.count:
            return None
        u, pick = _draw(self.plan.seed, i, key)
        if u >= rule.probability:
            return None
        self._hits[i] += 1
        return u, pick

    def message_fault(self, mid: Any, nbytes: int) -> Hit | None:
        """The fault for message ``mid`` (a MessageId), or None.  Logs the event."""
        if not self._message_rules:
            return None
        for i, r in self._message_rules:
            if ((r.step is not None and r.step != mid.step)
                    or (r.layer is not None and r.layer != mid.layer)
                    or (r.src is not None and r.src != mid.src)
                    or (r.dst is not None and r.dst != mid.dst)
                    or (r.phase is not None and r.phase != mid.phase)
                    or (r.chunk is not None and r.chunk != mid.chunk)):
                continue
            if r.kind == "corrupt" and nbytes == 0:
                continue  # nothing to corrupt in an empty chunk
            got = self._take(i, r, tuple(mid))
            if got is None:
                continue
            extra: dict[str, Any] = {"rule": i, "rank": self.rank}
            if r.kind == "delay":
                extra["delay_ms"] = r.delay_ms
            if r.kind == "corrupt":
                extra["corrupt"] = r.corrupt
            ev = fault_event(r.kind, mid, **extra)
            self.log(ev)
            return Hit(i, r, got[0], got[1], ev)
        return None

    def collective_faults(self, step: int, layer: int, algorithm: str) -> list[Hit]:
        """crash/slow rules that hit this rank at the start of collective (step, layer)."""
        out: list[Hit] = []
        for i, r in self._collective_rules:
            if r.layer is not None and r.layer != layer:
                continue
            if r.step is not None and r.step != step:
                continue
            if r.kind == "crash" and self._hits[i] >= 1:
                continue
            got = self._take(i, r, (step, layer, self.rank))
            if got is None:
                continue
            ev = fault_event(r.kind, None, step=step, layer=layer, algorithm=algorithm,
                             src=self.rank, rule=i, rank=self.rank, delay_ms=r.delay_ms)
            self.log(ev)
            out.append(Hit(i, r, got[0], got[1], ev))
        return out


def describe(ev: Mapping[str, Any] | None) -> str:
    """A one-line human description of a fault event (for error messages)."""
    if not ev:
        return ""
    kind = ev.get("kind")
    where = f"rule {ev.get('rule')}"
    if kind == "delay":
        return f"delay of {ev.get('delay_ms')} ms ({where})"
    if kind == "corrupt":
        return f"corrupt ({ev.get('corrupt')}) ({where})"
    if kind == "crash":
        return f"crash of rank {ev.get('rank')} at step {ev.get('step')} ({where})"
    return f"{kind} ({where})"
