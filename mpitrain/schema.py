"""The job file's vocabulary and its one validator: every name a job speaks, declared once.

* The **algorithm registry** (:data:`ALGORITHM_PHASES`): each allreduce algorithm and the
  phases its messages carry.  ``comm/allreduce.py`` implements exactly these names (it
  checks so at import), the wire format numbers them, fault rules and the tools list them.
* The **fault vocabulary** (kinds, phases, corruption modes, delivery modes) and the **one
  fault-rule schema**, :class:`FaultRule`, used by job files, ``--fault``, the injector
  and the tests alike; :func:`validate_plan` checks a plan against the job it runs in.
* **Key declarations** (:func:`key`) and the walker that validates a table of values into
  a declared dataclass (:func:`build`), so an unknown key, a wrong type or a value out of
  range becomes one :class:`~mpitrain.errors.ConfigError` naming where the value came
  from, the key, and what is allowed (with the closest valid value when there is one).

No MPI, no I/O: ``config.py`` (loading) and ``comm/`` (using) both build on this module.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import ConfigError

# --------------------------------------------------------------------------- vocabulary
#: Every allreduce algorithm and the phases of its messages (native MPI has none we see).
ALGORITHM_PHASES: dict[str, tuple[str, ...]] = {
    "native": (),
    "ring": ("reduce_scatter", "allgather"),
    "recursive_doubling": ("exchange",),
    "tree": ("reduce", "broadcast"),
}
ALGORITHMS = tuple(ALGORITHM_PHASES)
OWN_ALGORITHMS = tuple(a for a in ALGORITHMS if a != "native")  # built from transport messages
PHASES = tuple(p for phases in ALGORITHM_PHASES.values() for p in phases)

DELIVERY_MODES = ("strict", "lossy", "reliable")
MESSAGE_KINDS = ("drop", "delay", "corrupt", "duplicate", "reorder")  # act on one message
COLLECTIVE_KINDS = ("crash", "slow")  # act on a rank at the start of a collective
FAULT_KINDS = MESSAGE_KINDS + COLLECTIVE_KINDS
CORRUPT_MODES = ("bitflip", "nan")
# What the survivors of a rank's death do: "abort" ends the job with an attributed error (a
# restart relaunches it); "shrink" carries on in place without the dead (ULFM, recovery.py).
RECOVERY_MODES = ("abort", "shrink")


# --------------------------------------------------------------------------- declarations
def key(default: Any, *, choices: tuple | None = None, lo: float | None = None,
        hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
        doc: str = "") -> Any:
    """Declare one job-file key: its default and what is allowed."""
    meta = dict(choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, doc=doc)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def suggest(word: str, options: Sequence[str] | Mapping[str, Any]) -> str:
    """' (did you mean 'x'?)' for the closest of ``options``, or ''."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def toml_value(value: Any) -> str:
    """``value`` written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def one_of(names: Sequence[str]) -> str:
    """'"a", "b" or "c"'."""
    quoted = [f'"{n}"' for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def show(value: Any) -> str:
    """``value`` as the user would have written it."""
    return toml_value(value) if isinstance(value, (bool, int, float, str, list)) else repr(value)


# --------------------------------------------------------------------------- validation
def build(cls: type, table: Mapping[str, Any], sec: str, where_of: Callable[[str], str]) -> Any:
    """Validate ``table`` into the declared dataclass ``cls``; ``where_of(key)`` names the
    source of each key (file, variable or option) for messages."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for k, value in table.items():
        if k not in names:
            raise ConfigError(f"{where_of(k)}: unknown key '{k}' in [{sec}]{suggest(k, names)}; "
                              f"allowed: {', '.join(names)}")
        values[k] = check(cls, k, hints[k], value, where_of(k), sec)
    return cls(**values)


def check(cls: type, k: str, hint: Any, value: Any, where: str, sec: str) -> Any:
    """The value of key ``k`` of ``cls`` (type ``hint``), checked against its declaration."""
    meta = next(f for f in dataclasses.fields(cls) if f.name == k).metadata
    label = f"{where}: [{sec}] {k} = {show(value)}"
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and value is None:
        return None
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if typing.get_origin(base) is list:
        (item_type,) = typing.get_args(base)
        if not isinstance(value, list):
            raise ConfigError(f"{label}: must be a list")
        if isinstance(item_type, type) and dataclasses.is_dataclass(item_type):
            return [_build_item(item_type, v, where, i) for i, v in enumerate(value)]
        if not value:
            raise ConfigError(f"{label}: must not be empty")
        out = [_check_scalar(item_type, v, label) for v in value]
        if item_type is int and any(v < 1 for v in out):
            raise ConfigError(f"{label}: every width must be >= 1")
        return out
    value = _check_scalar(base, value, label)
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{label}: allowed values are {', '.join(map(repr, meta['choices']))}"
                          f"{suggest(str(value), meta['choices'])}")
    _check_range(value, meta, label)
    return value


def _build_item(cls: type, value: Any, where: str, index: int) -> Any:
    """One table of a list of tables (``[[faults.rules]]``)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: faults.rules[{index}] must be a table like "
                          f"{{kind = \"drop\", step = 3}}, got {show(value)}")
    if "kind" not in value:
        raise ConfigError(f"{where}: faults.rules[{index}] needs a kind; allowed: "
                          f"{', '.join(FAULT_KINDS)}")
    try:
        return build(cls, value, f"faults.rules[{index}]", lambda k: where)
    except ConfigError as err:  # a rule's own cross-key check does not know the source
        if not err.message.startswith(where):
            err.message = f"{where}: faults.rules[{index}]: {err.message}"
        raise


def _check_scalar(typ: type, value: Any, label: str) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: must be true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: must be an integer")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{label}: must be a finite number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label}: must be a string (quote it in TOML)")
        return value
    raise TypeError(typ)  # a declaration this module does not know: a bug, not bad input


def _check_range(value: Any, meta: Mapping, label: str) -> None:
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        raise ConfigError(f"{label}: must be {'>' if meta['lo_open'] else '>='} {lo}")
    if hi is not None and (value > hi or (meta["hi_open"] and value == hi)):
        raise ConfigError(f"{label}: must be {'<' if meta['hi_open'] else '<='} {hi}")


# --------------------------------------------------------------------------- fault rules
@dataclass(frozen=True)
class FaultRule:
    """One rule of a fault plan (a ``[[faults.rules]]`` table, or a ``--fault`` option).

    ``kind`` is one of :data:`FAULT_KINDS`.  The filters ``step``, ``layer``, ``src``,
    ``dst``, ``phase``, ``chunk`` are None (match anything) or a value the message must
    have.  ``probability`` is the chance that a matching message is hit; ``count`` the most
    messages the rule hits per sending rank.  ``delay_ms`` is the delay of a "delay" fault
    and the sleep of a "slow" rank.  ``rank`` (or, if unset, ``src``) names the rank of a
    "crash" or "slow" rule.  Constructing one validates it.
    """

    kind: str = key("drop", choices=FAULT_KINDS)
    step: int | None = key(None, lo=1)
    layer: int | None = key(None, lo=0)
    src: int | None = key(None, lo=0)
    dst: int | None = key(None, lo=0)
    phase: str | None = key(None, choices=PHASES)
    chunk: int | None = key(None, lo=0)
    probability: float = key(1.0, lo=0.0, hi=1.0, doc="chance per matching message")
    count: int | None = key(None, lo=1)
    delay_ms: float = key(0.0, lo=0.0)
    corrupt: str = key("bitflip", choices=CORRUPT_MODES)
    rank: int | None = key(None, lo=0, doc="crash and slow: the rank it acts on")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # the same checks as a job file's rule
            value = check(type(self), f.name, hints[f.name], getattr(self, f.name),
                          f"fault rule {self.kind!r}", "faults.rules")
            object.__setattr__(self, f.name, value)
        if self.kind in COLLECTIVE_KINDS and self.target_rank is None:
            raise ConfigError(f"fault rule {self.kind!r}: needs `rank` (or `src`): the rank "
                              f"that crashes / is slow")

    @property
    def target_rank(self) -> int | None:
        """The rank a crash/slow rule acts on."""
        return self.rank if self.rank is not None else self.src

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "fault rule") -> "FaultRule":
        """A rule from a table of keys, validated like a job file's."""
        return build(cls, d, "faults.rules", lambda k: where)


@dataclass(frozen=True)
class PlanScope:
    """What a fault plan must fit: the job's ranks, layers, buckets, steps and algorithm."""

    size: int
    n_layers: int
    total_steps: int
    algorithm: str
    buckets: Sequence[tuple[int, int]] = ()  # (lo, hi) of fused allreduces
    bucket_bytes: int = 0
    #: A resume on another rank count: the ranks of the run it continues (the checkpoint's).
    #: A rule naming a rank that run had and this one lacks is inert (nothing to act on),
    #: not refused: the plan was valid where it started.  0: a fresh start.
    resumed_from: int = 0
    #: False for a resume whose checkpoint is not read yet: rank filters wait for it.
    check_ranks: bool = True


def inert_rules(rules: Sequence[FaultRule], size: int) -> list[int]:
    """The indices of the rules that cannot hit anything on ``size`` ranks: the rank a crash
    or slow rule acts on, or a message rule's src or dst (both must match), is >= ``size``."""
    def named(rule: FaultRule) -> tuple[int | None, ...]:
        return (rule.target_rank,) if rule.kind in COLLECTIVE_KINDS else (rule.src, rule.dst)
    return [i for i, rule in enumerate(rules)
            if any(r is not None and r >= size for r in named(rule))]


def validate_plan(rules: Sequence[FaultRule], scope: PlanScope,
                  sources: Sequence[str]) -> None:
    """Every rule must be able to hit something in this job; say why not if one can't.

    ``sources[i]`` names where rule i came from (the job file, ``--fault``) in messages.
    """
    for i, rule in enumerate(rules):
        _validate_rule(rule, scope,
                       f"{sources[i]}: [[faults.rules]] rule {i} (kind = \"{rule.kind}\")")


def _validate_rule(rule: FaultRule, s: PlanScope, label: str) -> None:
    ranks = max(s.size, s.resumed_from)
    for name in ("src", "dst", "rank"):
        value = getattr(rule, name)
        if s.check_ranks and value is not None and value >= ranks:
            earlier = (f", nor had the run it resumes ({s.resumed_from})"
                       if s.resumed_from > s.size else "")
            raise ConfigError(f"{label}: {name} = {value}, but the job has {s.size} ranks "
                              f"(0..{s.size - 1}){earlier}")
    if rule.step is not None and rule.step > s.total_steps:
        raise ConfigError(f"{label}: step = {rule.step}, but the run has {s.total_steps} steps")
    collective = rule.kind in COLLECTIVE_KINDS
    ignored = ([k for k in ("phase", "chunk", "dst") if getattr(rule, k) is not None]
               if collective else (["rank"] if rule.rank is not None else []))
    if ignored:
        why = ("crash and slow act on a rank at the start of a collective" if collective
               else "message faults pick messages by src and dst")
        raise ConfigError(f"{label}: {', '.join(ignored)} cannot apply to this kind: {why}",
                          hint="remove the key, or use another kind")
    if rule.layer is not None and rule.layer >= s.n_layers:
        raise ConfigError(f"{label}: layer = {rule.layer}, but the model has {s.n_layers} "
                          f"layers (0..{s.n_layers - 1}, from the input side)")
    fused = next(((lo, hi) for lo, hi in s.buckets if rule.layer is not None
                  and lo < rule.layer <= hi), None)
    if fused is not None:
        raise ConfigError(f"{label}: layer = {rule.layer} travels in the fused allreduce of "
                          f"layers {fused[0]}..{fused[1]} ([sync] bucket_bytes = "
                          f"{s.bucket_bytes}), which is named by its lowest layer",
                          hint=f"use layer = {fused[0]}, or set [sync] bucket_bytes = 0 "
                               f"(one allreduce per layer)")
    if rule.kind in MESSAGE_KINDS and s.algorithm == "native":
        raise ConfigError(f"{label}: message faults act on the harness's own allreduce "
                          f"algorithms; [sync] algorithm = \"native\" is MPI's allreduce, "
                          f"which cannot be intercepted message by message",
                          hint=f"set [sync] algorithm = {one_of(OWN_ALGORITHMS)}")
    phases = ALGORITHM_PHASES[s.algorithm]
    if rule.phase is not None and s.algorithm != "native" and rule.phase not in phases:
        raise ConfigError(f"{label}: phase = \"{rule.phase}\" never occurs in the "
                          f"{s.algorithm} allreduce; its phases are {', '.join(phases)}")
