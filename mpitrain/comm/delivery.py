"""Delivery modes (``delivery=``): what the transport does about a message that is missing,
stale, early or corrupted.  One policy object per transport (:func:`make_delivery`).

strict   every receive has a deadline; a missing or (checksums on) corrupted message makes
         every rank raise the same :class:`SyncError` (see :mod:`mpitrain.comm.agreement`).
         A large payload may be sent straight from the caller's buffer (``borrows``).
lossy    a message missing at its deadline counts as absent: ``recv`` returns None and the
         algorithm adds zeros; no checksums (corruption flows into the result, as on a
         network without them).  A "drop" fault sends a header-only tombstone instead of
         the message, so the receiver counts it absent at once: drops cost no waiting,
         replay exactly and cannot make other ranks time out.  Messages late beyond the
         deadline (delay faults, slow ranks) count as absent by timeout.  Every absent
         message is appended to :attr:`Transport.lost` and announced on
         :data:`~mpitrain.comm.tags.TAG_LOSS`; a rank that hears of a loss upstream waits
         a deadline more, so one loss does not cascade into timeouts downstream.
reliable go-back-N: sequence numbers, CRC, cumulative acknowledgements on
         :data:`~mpitrain.comm.tags.TAG_ACK`, retransmission of everything
         unacknowledged after ``rto_s``.  The receiver discards out-of-order and corrupted
         messages and re-acknowledges stale ones.  Results are bitwise those of a
         fault-free run.  Costs are counted in :attr:`Transport.stats`.

The transport calls the hooks of :class:`Delivery` at fixed points of its message path;
the base class is strict delivery.  A new mode is a subclass registered in
:data:`MODES`.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

from mpitrain.comm.tags import TAG_ACK, TAG_LOSS
from mpitrain.comm.waiting import Waiter
from mpitrain.comm.wire import MessageId, Packet, payload_bytes, tombstone

if TYPE_CHECKING:
    from mpitrain.comm.transport import Transport


class Delivery:
    """Strict delivery, and the hooks every mode may override.

    ``checksums``: receivers verify payload checksums.  ``borrows``: a large payload may
    be sent from the caller's memory (nothing needs it after the send: reliable delivery
    keeps a copy to resend; a lossy receiver may give up on a message, which would leave
    its sender waiting in settle).  ``retransmits``: lost messages are resent.  ``rto_s``:
    the retransmission timeout (reliable delivery).
    """

    name = "strict"
    borrows = True
    retransmits = False

    def __init__(self, transport: Transport, checksum: bool, rto_s: float):
        self.t = transport
        self.checksums = checksum

    # ---- sender side
    def on_send(self, dst: int, seq: int, pkt: Packet, on_wire: bool = True) -> None:
        """Packet ``seq`` to ``dst`` is sent (``on_wire`` False: held or delayed by a fault)."""

    def on_release(self, dst: int, seq: int) -> None:
        """A held or delayed packet goes on the wire now."""

    def needed(self, dst: int, seq: int) -> bool:
        """Whether packet ``seq`` to ``dst`` must still reach it (held or delayed packets a
        collective waits for); False once a retransmission has been acknowledged."""
        return True

    def on_drop(self, dst: int, seq: int, pkt: Packet) -> None:
        """A "drop" fault swallowed packet ``seq`` to ``dst``."""

    # ---- receiver side
    def on_stale(self, src: int, expected: int) -> None:
        """A packet older than ``expected`` (the number wanted from ``src``) was discarded."""

    def keep_early(self, src: int, expected: int) -> bool:
        """A packet newer than ``expected`` arrived: keep it for later (True) or discard it."""
        return True

    def on_corrupt(self, mid: MessageId, seq: int) -> None:
        """Message ``mid`` (number ``seq``) failed its checksum: return None to wait on."""
        self.t.agreement.fail_corrupt(mid)

    def on_received(self, src: int, seq: int) -> None:
        """Packet ``seq`` from ``src`` was accepted."""

    def deadline_moved(self, wait: Waiter) -> bool:
        """At the deadline of a receive: True if the wait goes on (with a moved deadline)."""
        return False

    def on_timeout(self, mid: MessageId, waited: float) -> None:
        """Message ``mid`` is missing at its deadline: None (counted absent), or raise."""
        self.t.agreement.report_wait(mid, mid.src, waited)

    def absent(self, mid: MessageId) -> None:
        """Count ``mid`` as absent (lossy delivery: by timeout, or its tombstone arrived);
        tell every other rank, so their waits downstream of it go on.  Returns None."""
        t = self.t
        t.lost.append(mid)
        t.stats["lost"] += 1
        if t.tracer.on:  # called inside the receive of ``mid``: its number is the last taken
            t.tracer.absent(mid, t._recv_seq[mid.src] - 1)
        for r in range(t.size):
            if r != t.rank:
                t.outbox.post_control(r, TAG_LOSS, tuple(mid))
        if t.emit is not None:
            t.emit({"event": "lost", **mid._asdict(), "rank": t.rank, "t": time.time()})
        return None

    # ---- while waiting
    def background(self) -> None:
        """Work that must progress while the transport waits (acks, retransmission)."""

    def unacked_peer(self) -> int | None:
        """A peer that has not acknowledged everything yet (drain waits), or None."""
        return None


class Lossy(Delivery):
    """A message missing at its deadline counts as absent; no checksums."""

    name = "lossy"
    borrows = False

    def __init__(self, transport: Transport, checksum: bool, rto_s: float):
        super().__init__(transport, False, rto_s)
        self._loss_heard = float("-inf")  # monotonic time a loss was last announced

    def on_drop(self, dst: int, seq: int, pkt: Packet) -> None:
        self.t.transmit(dst, (tombstone(pkt[0]), None))  # the receiver knows at once

    def background(self) -> None:
        comm = self.t.comm
        if comm.Iprobe(MPI.ANY_SOURCE, TAG_LOSS):
            st = MPI.Status()
            while comm.Iprobe(MPI.ANY_SOURCE, TAG_LOSS, st):
                comm.recv(source=st.Get_source(), tag=TAG_LOSS)
            self._loss_heard = time.monotonic()

    def deadline_moved(self, wait: Waiter) -> bool:
        if self._loss_heard > wait.deadline - wait.deadline_s:  # a loss upstream: wait again
            wait.restart_at(self._loss_heard)
            return True
        return False

    def on_timeout(self, mid: MessageId, waited: float) -> None:
        # A fence is a liveness check, never a lossy message: a missing peer is an error
        # even in lossy mode (the native collectives after it have no deadline).
        if mid.algorithm == "fence":
            super().on_timeout(mid, waited)
        return self.absent(mid)


class Reliable(Delivery):
    """Go-back-N: acknowledge, resend everything unacknowledged after ``rto_s``."""

    name = "reliable"
    borrows = False
    retransmits = True

    def __init__(self, transport: Transport, checksum: bool, rto_s: float):
        if not checksum:
            raise ValueError("reliable delivery needs checksums (it resends corrupted messages)")
        super().__init__(transport, checksum, rto_s)
        self.rto_s = rto_s
        # per destination: seq -> [packet, t_sent (None while held), t_first, tries]
        self._unacked: list[dict[int, list]] = [{} for _ in range(transport.size)]
        self._ack_buf = np.zeros(1, np.int64)

    def on_send(self, dst: int, seq: int, pkt: Packet, on_wire: bool = True) -> None:
        now = time.monotonic()  # the original counts as sent now: the rto clock starts
        self._unacked[dst][seq] = [pkt, now if on_wire else None, now, 0]

    def on_release(self, dst: int, seq: int) -> None:
        # It may already be acknowledged: a retransmission got there first.
        entry = self._unacked[dst].get(seq)
        if entry is not None and entry[1] is None:
            entry[1] = time.monotonic()

    def needed(self, dst: int, seq: int) -> bool:
        return seq in self._unacked[dst]

    def on_stale(self, src: int, expected: int) -> None:
        self._ack(src, expected - 1)

    def keep_early(self, src: int, expected: int) -> bool:
        self.t.stats["out_of_order_discarded"] += 1  # the sender resends it in order
        self._ack(src, expected - 1)
        return False

    def on_corrupt(self, mid: MessageId, seq: int) -> None:
        self._ack(mid.src, seq - 1)

    def on_received(self, src: int, seq: int) -> None:
        self._ack(src, seq)

    def unacked_peer(self) -> int | None:
        return next((d for d, p in enumerate(self._unacked) if p), None)

    def _ack(self, src: int, upto: int) -> None:
        self.t.outbox.isend(np.array([upto], np.int64), src, TAG_ACK)

    def background(self) -> None:
        self._drain_acks()
        self._retransmit_due()

    def _drain_acks(self) -> None:
        comm, st, buf = self.t.comm, MPI.Status(), self._ack_buf
        while comm.Iprobe(MPI.ANY_SOURCE, TAG_ACK, st):
            src = st.Get_source()
            comm.Recv(buf, src, TAG_ACK)
            upto, pending = int(buf[0]), self._unacked[src]
            if not pending:
                continue
            now = time.monotonic()
            for s in [s for s in pending if s <= upto]:
                entry = pending.pop(s)
                if entry[3]:
                    self.t.stats["recovery_s"] += now - entry[2]

    def _retransmit_due(self) -> None:
        now = time.monotonic()
        for dst, pending in enumerate(self._unacked):
            if not pending:
                continue
            first = pending[min(pending)]
            if now - (first[2] if first[1] is None else first[1]) < self.rto_s:
                continue
            for s in sorted(pending):  # go-back-N: resend all unacknowledged, in order
                entry = pending[s]
                entry[1], entry[3] = now, entry[3] + 1
                self.t.stats["retransmissions"] += 1
                self.t.traffic.retransmitted(dst, payload_bytes(entry[0]))
                if self.t.tracer.on:
                    self.t.tracer.retransmitted(dst, entry[0])
                self.t.transmit(dst, entry[0])


MODES: dict[str, type[Delivery]] = {"strict": Delivery, "lossy": Lossy, "reliable": Reliable}


def make_delivery(mode: str, transport: Transport, checksum: bool, rto_s: float) -> Delivery:
    """The policy for ``mode`` (a key of :data:`MODES`); ValueError if unknown or unusable."""
    if mode not in MODES:
        raise ValueError(f"delivery must be one of {tuple(MODES)}, not {mode!r}")
    return MODES[mode](transport, checksum, rto_s)
