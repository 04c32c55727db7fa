"""Cross-rank consistency checks for lossy delivery (and as a safety net anywhere).

Two checks, because they see different failures (DESIGN.md, "lossy"):

replica hash check (:func:`check_replicas`)
    A hash per layer of the parameters, compared across ranks.  Sees a
    replica that differs from the others -- e.g. a ring *allgather* chunk lost
    on its way to one rank.  Raises :class:`DivergenceError` naming the first
    layer that differs, the rank(s) that differ (the minority; with no majority,
    every group) and the step.

end-to-end sum check (:class:`SumCheck`)
    The reduction is linear, so ``sum(reduced)`` must equal the SUM over ranks
    of each rank's ``sum(local)`` (and the same for a fixed positive weighting
    ``w_i = 1 + (i mod 7)/8``, which catches a lost chunk whose plain sum happens
    to be ~0).  Sees a contribution lost in a *reduce-scatter* (or tree reduce,
    or doubling exchange): that error is gathered to every rank, so all
    replicas are equally wrong and no hash comparison can see it.  Raises
    :class:`ReductionError` when every rank fails the check, and
    :class:`DivergenceError` when only some do.

Both are collective (every rank must call them, at the same point) and talk through a
:class:`~mpitrain.comm.guarded.GuardedComm`: native MPI collectives with a deadline, so a
rank that died or got stuck before a check is named in a SyncError instead of leaving the
others inside MPI for ever.  ``lost`` (the
transport's :attr:`~mpitrain.comm.transport.Transport.lost`) adds which
messages each rank counted as absent to the error message.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

import numpy as np
from mpitrain.errors import DivergenceError, NumericsError, ReductionError, SyncError

if TYPE_CHECKING:  # only the type: diagnose and report read ranks_text without any MPI
    from mpitrain.comm.guarded import GuardedComm


def layer_hashes(layers: Sequence[Iterable[np.ndarray]]) -> list[str]:
    """One hex digest per layer over the bytes (and shapes) of its arrays, in order."""
    out = []
    for arrays in layers:
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(repr((a.shape, a.dtype.str)).encode())
            h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
        out.append(h.hexdigest())
    return out


def _lost_lines(guard: GuardedComm, lost, step: int | None, at: tuple[str, int],
                fused: dict[int, int] | None = None) -> list[str]:
    """Collective: every rank's messages counted as absent (of ``step``), one line each.

    ``at``: the check and step that ask (they name the collective if a rank is missing).
    ``fused`` maps a bucket's lowest layer to its highest: a message of a fused allreduce
    is named by the bucket's lowest layer, which the line spells out.
    """
    mine = [tuple(m) for m in (lost or ()) if step is None or m[0] == step]
    lines = []
    for r, items in enumerate(guard.allgather(mine, *at)):
        for (st, layer, alg, phase, chunk, src, dst) in items:
            name = (f"layer {layer}" if not fused or layer not in fused
                    else f"layer {layer} (fused layers {layer}..{fused[layer]})")
            lines.append(f"rank {r} counted as absent: step {st}, {name}, {alg} {phase} "
                         f"chunk {chunk} from rank {src}")
    return lines


class StepEvidence(NamedTuple):
    """What the end-to-end checks of a step need from the transport (Transport.evidence)."""

    lost: list  # every MessageId this rank counted absent so far
    checksums: bool  # whether messages carried a checksum (same on every rank)
    told: list[str]  # injected faults senders told this rank of, on this step


def ranks_text(ranks: Sequence[int]) -> str:
    """'rank 3' or 'ranks 0, 2'."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _groups(values: Sequence) -> list[list[int]]:
    groups: dict = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


REPLICA_CHECK = "the replica check"
END_TO_END_CHECK = "the end-to-end check"


def check_replicas(guard: GuardedComm, layers: Sequence[Iterable[np.ndarray]], step: int,
                   lost=None) -> None:
    """Raise DivergenceError if any layer's parameters differ between ranks (collective).

    ``layers[i]`` are the arrays of layer i (e.g. weight and bias), i from 0 at
    the input.  The error has attributes ``step``, ``layer``, ``ranks`` (the
    ranks named as diverged) and ``groups``.
    """
    table = guard.allgather(layer_hashes(layers), REPLICA_CHECK, step)
    for i in range(len(table[0])):
        groups = _groups([t[i] for t in table])
        if len(groups) == 1:
            continue
        if len(groups[0]) > len(groups[1]):  # a strict majority is taken as the truth
            diverged = sorted(r for g in groups[1:] for r in g)
            what = (f"rank{'s' if len(diverged) > 1 else ''} {', '.join(map(str, diverged))} "
                    f"differ{'' if len(diverged) > 1 else 's'} from ranks "
                    f"{', '.join(map(str, groups[0]))}")
        else:
            diverged = sorted(r for g in groups for r in g)
            what = "no majority: " + " vs ".join("ranks " + ",".join(map(str, g)) for g in groups)
        when = "before step 1" if step == 0 else f"at step {step}"
        msg = f"replicas diverged {when}: layer {i} parameters: {what}."
        extra = _lost_lines(guard, lost, None, (REPLICA_CHECK, step))
        if extra:
            msg += " Messages lost: " + "; ".join(extra) + "."
        hint = ("replicas must start equal: every rank must initialise from the same seed or "
                "the same [model] init file" if step == 0 else
                "lossy delivery lost a message in an allgather/broadcast: only its receiver(s) "
                "got the wrong gradient")
        raise DivergenceError(msg, hint=hint, reporter=0, step=step, layer=i, ranks=diverged,
                              groups=groups)


class SumCheck:
    """End-to-end check of one step's per-layer allreduces (SUM).

    Per layer, call :meth:`before` with the local gradient *before* starting its
    allreduce and :meth:`after` with the reduced buffer once it is complete;
    then :meth:`verify` once per step on every rank (collective).  One native
    allreduce of 3 scalars per layer.
    """

    def __init__(self) -> None:
        self._local: dict[int, tuple[float, float, float]] = {}
        self._reduced: dict[int, tuple[float, float]] = {}
        self._wcache: dict[int, np.ndarray] = {}
        self._eps: dict[int, float] = {}

    def _w(self, n: int) -> np.ndarray:
        w = self._wcache.get(n)
        if w is None:
            w = self._wcache[n] = 1.0 + (np.arange(n) % 7) / 8.0
        return w

    def before(self, layer: int, buf: np.ndarray) -> None:
        x = buf.astype(np.float64, copy=False)
        self._local[layer] = (float(x.sum()), float(x @ self._w(x.size)), float(np.abs(x).sum()))
        self._eps[layer] = float(np.finfo(buf.dtype).eps) if buf.dtype.kind == "f" else 0.0

    def after(self, layer: int, buf: np.ndarray) -> None:
        x = buf.astype(np.float64, copy=False)
        self._reduced[layer] = (float(x.sum()), float(x @ self._w(x.size)))

    def verify_finite(self, guard: GuardedComm, step: int) -> None:
        """Raise NumericsError if a reduced gradient holds NaN/Inf (collective; call first).

        Names the first such layer and where the NaN came from: the rank(s) whose own
        gradient was not finite, or -- all of them finite -- a message that carried it in.
        """
        bad = sorted(i for i, (s, _) in self._reduced.items() if not np.isfinite(s))
        own = sorted(i for i, v in self._local.items() if not np.isfinite(v[0]))
        table = guard.allgather((bad, own), END_TO_END_CHECK, step)
        if not any(b for b, _ in table):
            return
        layer = min(i for b, _ in table for i in b)
        sources = [r for r, (_, o) in enumerate(table) if layer in o]
        seen = [r for r, (b, _) in enumerate(table) if layer in b]
        if sources:
            msg = (f"step {step}, layer {layer}: the gradient computed by {ranks_text(sources)} "
                   f"holds NaN/Inf, so the averaged gradient is NaN on {ranks_text(seen)}")
            hint = "lower [optim] lr or check the data; the optimizer step was not taken"
        else:
            msg = (f"step {step}, layer {layer}: the reduced gradient holds NaN/Inf on "
                   f"{ranks_text(seen)} although every rank's own gradient was finite: a corrupted "
                   f"message carried it in; the optimizer step was not taken")
            hint = ("the messages carried no checksum (lossy delivery, or [faults] checksum "
                    "= \"none\"); strict and reliable delivery with checksums detect "
                    "corruption by CRC")
        self._local.clear()
        self._reduced.clear()
        raise NumericsError(msg, hint=hint, reporter=0, step=step, layer=layer,
                            ranks=sources or seen)

    def verify(self, guard: GuardedComm, step: int, lost=None, *, checksums: bool = True,
               told: Sequence[str] = (), fused: dict[int, int] | None = None) -> None:
        """Raise ReductionError / DivergenceError if a layer's sum is off (collective).

        ``lost``: the messages this rank counted as absent.  ``checksums``: whether the
        messages carried one (same on every rank); without, and with nothing lost, an off sum
        means a message was altered in flight.  ``told``: the injected faults this rank was
        told of in this step.  ``fused``: bucket lowest layer -> highest (see _lost_lines).
        """
        layers = sorted(self._local)
        local = np.array([self._local[i] for i in layers], np.float64).reshape(-1, 3)
        total = guard.sum(local, END_TO_END_CHECK, step)
        p = guard.size
        bad = []
        for k, i in enumerate(layers):
            tol = 4.0 * p * self._eps[i] * total[k, 2] * 2.0 + 1e-300
            got = self._reduced.get(i, (np.nan, np.nan))
            if not (abs(got[0] - total[k, 0]) <= tol and abs(got[1] - total[k, 1]) <= tol):
                bad.append((i, got[0], total[k, 0]))
        self._local.clear()
        self._reduced.clear()
        table = guard.allgather(bad, END_TO_END_CHECK, step)
        failing = [i for b in table for i, *_ in b]
        if not failing:  # the same answer on every rank: the table was gathered
            return
        extra = _lost_lines(guard, lost, step, (END_TO_END_CHECK, step), fused)
        layer = min(failing)
        ranks = [r for r, b in enumerate(table) if any(i == layer for i, *_ in b)]
        got, want = next((g, w) for i, g, w in table[ranks[0]] if i == layer)
        lost_txt = (" Messages lost: " + "; ".join(extra) + ".") if extra else ""
        where = dict(reporter=0, step=step, layer=layer, ranks=ranks)
        if not extra and not checksums:  # nothing lost: a message arrived, but altered
            raise _altered(step, layer, ranks, p, got, want,
                           sorted({t for ts in guard.allgather(list(told), END_TO_END_CHECK, step)
                                   for t in ts}))
        if len(ranks) == p:
            raise ReductionError(
                f"end-to-end check failed at step {step}, layer {layer}: the reduced gradient sums "
                f"to {got:.9g} on every rank but the ranks' gradients sum to {want:.9g}: a "
                f"contribution was lost during the reduction (all replicas are equally wrong, so "
                f"the replica hash cannot see it).{lost_txt}",
                hint="a message was lost in a reduce-scatter/reduce phase; use delivery = "
                     "\"reliable\" or \"strict\"", **where)
        raise DivergenceError(
            f"end-to-end check failed at step {step}, layer {layer} on rank"
            f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} only: their reduced "
            f"gradient sums to {got:.9g}, expected {want:.9g}; the replicas diverge.{lost_txt}",
            hint="a message was lost on its way to these ranks (allgather/broadcast)", **where)


def _altered(step: int, layer: int, ranks: list[int], p: int, got: float, want: float,
             told: list[str]) -> SyncError:
    """The error for an off sum with nothing lost, on a transport without checksums."""
    where: dict = dict(reporter=0, step=step, layer=layer, ranks=ranks)
    told_txt = (" Injected faults: " + "; ".join(told) + ".") if told else ""
    hint = ("the messages carry no checksum (lossy delivery, or [faults] checksum = \"none\"); "
            "with a checksum (\"xxh3\", \"crc32c\"), strict delivery names the corrupted message and "
            "reliable delivery resends it")
    if len(ranks) == p:
        return ReductionError(
            f"end-to-end check failed at step {step}, layer {layer}: the reduced gradient sums "
            f"to {got:.9g} on every rank but the ranks' gradients sum to {want:.9g}: a message "
            f"was altered in flight and no checksum caught it (all replicas are equally wrong, "
            f"so the replica hash cannot see it).{told_txt}", hint=hint, **where)
    return DivergenceError(
        f"end-to-end check failed at step {step}, layer {layer} on {ranks_text(ranks)} only: "
        f"their reduced gradient sums to {got:.9g}, expected {want:.9g}; the replicas diverge: "
        f"a message to them was altered in flight and no checksum caught it.{told_txt}",
        hint=hint, **where)
