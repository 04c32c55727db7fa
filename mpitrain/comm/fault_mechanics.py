"""Fault mechanics: what an injected fault does to a message on its way out, and to a rank.

The :class:`~mpitrain.comm.faults.FaultInjector` decides *whether* a message or a
collective is hit; :class:`FaultMechanics` carries the fault out, as a strategy object in
the transport's message path (the way Horovod keeps its compressor there).  The default,
:class:`NoFaults`, does nothing: with ``injector=None`` the transport's send path costs
one test more than a bare send (the transport keeps no mechanics to call).

Every message fault is told to the receiver first (a notice on
:data:`~mpitrain.comm.tags.TAG_NOTICE`), so an error it causes can name it.  Then:

drop       nothing is sent (lossy delivery sends a tombstone: see delivery.py)
corrupt    a copy with one bit flipped, or one element NaN, is sent with the original
           header and checksum (:func:`mpitrain.comm.wire.corrupted`)
duplicate  the message is sent twice
delay      the message waits in a heap until ``delay_ms`` have passed
reorder    the message is held until the next message to the same rank has left (at
           most :data:`HOLD_S`)
crash      the rank tells every other rank, flushes its ledger and dies with
           :data:`~mpitrain.errors.CRASH_EXIT` (``os._exit``)
slow       the rank sleeps ``delay_ms`` at the start of the collective

Held and delayed messages go out while the transport polls (:meth:`release_due`) and
before a collective ends (the transport's drain waits for :meth:`pending`).
"""
from __future__ import annotations

import heapq
import os
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from mpitrain.comm.faults import FaultInjector, Hit
from mpitrain.errors import CRASH_EXIT
from mpitrain.comm.tags import TAG_NOTICE
from mpitrain.comm.waiting import Waiter
from mpitrain.comm.wire import MessageId, Packet, corrupted, payload_change

if TYPE_CHECKING:
    from mpitrain.comm.transport import Transport

HOLD_S = 0.02  # a "reorder" fault holds a message at most this long
CRASH_FLUSH_S = 0.2  # a crashing rank waits this long at most for its last sends to leave


class NoFaults:
    """No injector: no fault, nothing held (the transport then skips the per-message
    hooks of :class:`FaultMechanics` altogether)."""
    effects: list[dict] = []  # the message faults carried out (see FaultMechanics)

    def pending(self) -> bool:
        """Whether held or delayed messages still wait to be sent."""
        return False

    def release_due(self) -> None:
        """Send the held and delayed messages whose time has come."""

    def begin_collective(self, step: int, layer: int, algorithm: str) -> None:
        """Apply this rank's collective faults ("slow", "crash") at a collective's start."""


class FaultMechanics(NoFaults):
    """Carries out the faults ``injector`` decides, on the messages of ``transport``."""


    def __init__(self, injector: FaultInjector, transport: Transport):
        self.injector = injector
        self.t = transport
        self._delayed: list[tuple[float, int, int, int, Packet]] = []  # heap (t_due, n, dst, seq, pkt)
        self._held: dict[int, tuple[float, int, Packet]] = {}  # dst -> (t_release, seq, pkt)
        self._n = 0
        self.effects: list[dict] = []  # each message fault: kind, mid, rule (corrupt: change)

    def decide(self, mid: MessageId, nbytes: int) -> Hit | None:
        """The fault for message ``mid`` (first transmission only), or None."""
        return self.injector.message_fault(mid, nbytes)

    def send(self, mid: MessageId, seq: int, pkt: Packet, dtype, hit: Hit) -> None:
        """Send packet ``seq`` of message ``mid`` as fault ``hit`` says."""
        t, kind, dst, now = self.t, hit.rule.kind, mid.dst, time.monotonic()
        t.outbox.post_control(dst, TAG_NOTICE, {"mid": tuple(mid), "fault": hit.event})
        t.agreement.note_own(mid, hit.event)
        t.traffic.faulted(dst, kind)
        if t.tracer.on:
            t.tracer.fault(mid, kind, hit.rule_index)
        effect = {"kind": kind, "mid": tuple(mid), "rule": hit.rule_index}
        self.effects.append(effect)
        t.delivery.on_send(dst, seq, pkt, on_wire=kind not in ("delay", "reorder"))
        if kind == "drop":
            t.delivery.on_drop(dst, seq, pkt)
        elif kind == "corrupt":
            altered = corrupted(pkt, dtype, hit.rule.corrupt, hit.pick)
            effect["change"] = payload_change(pkt, altered, dtype)
            t.transmit(dst, altered)
        elif kind == "duplicate":  # the receiver takes the first; nothing waits for the spare
            t.transmit(dst, pkt)
            t.transmit(dst, pkt, spare=True)
        elif kind == "delay":
            self._n += 1
            heapq.heappush(self._delayed, (now + hit.rule.delay_ms / 1e3, self._n, dst, seq, pkt))
        elif kind == "reorder":
            old = self._held.pop(dst, None)
            if old is not None:
                self._release(dst, old[1], old[2])
            self._held[dst] = (now + HOLD_S, seq, pkt)

    def after_transmit(self, dst: int) -> None:
        """A message to ``dst`` has left: a message held for reordering goes right after it."""
        if self._held:
            held = self._held.pop(dst, None)
            if held is not None:
                self._release(dst, held[1], held[2])

    def _release(self, dst: int, seq: int, pkt: Packet) -> None:
        self.t.delivery.on_release(dst, seq)
        self.t.transmit(dst, pkt)

    def pending(self) -> bool:
        """Held or delayed packets that must still be sent.  A packet that an acknowledged
        retransmission superseded (reliable delivery) is not waited for: it still goes out
        when due if the transport is polling then, as a late duplicate, but it never holds
        up its sender -- nor, through it, the other ranks."""
        needed = self.t.delivery.needed
        return any(needed(d, s) for _, _, d, s, _ in self._delayed) \
            or any(needed(d, h[1]) for d, h in self._held.items())

    def release_due(self) -> None:
        if not (self._delayed or self._held):
            return
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, dst, seq, pkt = heapq.heappop(self._delayed)
            self._release(dst, seq, pkt)
        for dst in [d for d, h in self._held.items() if h[0] <= now]:
            _, seq, pkt = self._held.pop(dst)
            self._release(dst, seq, pkt)

    def begin_collective(self, step: int, layer: int, algorithm: str) -> None:
        for hit in self.injector.collective_faults(step, layer, algorithm):
            if self.t.tracer.on:
                self.t.tracer.rank_fault(hit.rule.kind, layer)
            if hit.rule.kind == "slow":
                time.sleep(hit.rule.delay_ms / 1e3)
            elif hit.rule.kind == "crash":
                self._crash(hit.event)

    def _crash(self, ev: dict) -> NoReturn:
        """Die like a crashed process (os._exit), after telling the others it was injected."""
        t = self.t
        for r in range(t.size):
            if r != t.rank:
                t.outbox.post_control(r, TAG_NOTICE, {"crash": t.rank, "fault": ev})
        flush = Waiter(CRASH_FLUSH_S, spin_s=0.0)
        while not flush.expired() and not t.outbox.sent():
            flush.pause()
        if t.ledger is not None:
            t.ledger.flush()
        t.tracer.fail(SystemExit(CRASH_EXIT))  # this rank's part of the timeline, if tracing
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(CRASH_EXIT)
