"""The transport: the ONE place every point-to-point message of the harness passes.

Its parts, one job each, are listed in docs/architecture.md (wire, segments, delivery,
agreement, waiting, fault_mechanics, outbox, tags).  This module keeps the sequence numbers
and the stash.  Both sides of a channel (src -> dst) count messages in program order, so the
receiver knows which sequence number it wants: an older one is stale (a duplicate, or a
message that arrived after its deadline) and is discarded; a newer one arrived early
(reordered) and is stashed (strict, lossy) or discarded (reliable: the sender resends it in
order).  So a message is never taken for another, and the tag space stays tiny.  Each
transport (a connection) talks on its own duplicate of the communicator it is given, so a
late message of one connection can never be taken by the next.

A large payload is received straight into ``out`` (or added into ``add_to``, segment by
segment) and, in strict delivery, sent from the caller's buffer (``borrow=True``;
:meth:`Transport.settle` before it is written again).  A polling receive also runs the error
channel, acknowledgements, timers and delayed messages (:meth:`Transport._background`).
Faults are injected at the sender (without an injector: one test more than a bare send).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from mpitrain.comm.agreement import Agreement, grace_for
from mpitrain.comm.checks import StepEvidence
from mpitrain.comm.closing import close
from mpitrain.comm.delivery import make_delivery
from mpitrain.comm.fault_mechanics import FaultMechanics, NoFaults
from mpitrain.comm.guarded import duplicate
from mpitrain.comm.outbox import Outbox
from mpitrain.comm.segments import Payloads, post_segments
from mpitrain.comm.tags import TAG_DATA
from mpitrain.comm.traffic import Traffic
from mpitrain.comm.waiting import CHECK_MASK, Waiter, spin_budget
from mpitrain.comm.wire import (F_DROPPED, F_SPLIT, H_CRC, H_FLAGS, H_NBYTES, H_SEQ, HDR_BYTES,
                                HEADER, INLINE_MAX, MessageId, Packet, checksum_kind,
                                header_problem, pack_header, running_kind)
from mpitrain.trace import OFF, NoTrace

_ABSENT = object()  # _accept's answer for a lossy tombstone


class Transport:
    """Point-to-point messaging with deadlines, checksums and fault hooks.

    Must be created collectively (same arguments, same order of messages) on every rank of
    ``comm``; it talks on its own duplicate (:attr:`comm`, freed by :meth:`close`).  Not
    thread-safe.

    ``events``: a callable or a list receiving event dicts ("fault" events come from the
    injector; the transport adds ``{"event": "lost", ...}`` in lossy mode).  ``ledger``: a
    :class:`~mpitrain.comm.ledger.Ledger` flushed when a SyncError is raised.  ``rto_s``:
    reliable delivery's retransmission timeout; ``grace_s``: how long ranks collect error
    reports.  ``checksum``: the payload checksum's name ("xxh3", "crc32c"; True: the
    default), or False / "none" to trust MPI's delivery (not with reliable delivery).
    ``tracer``: the timeline's hooks (:mod:`mpitrain.trace`; off by default).
    """

    def __init__(self, comm, *, delivery: str = "strict", deadline_s: float = 10.0,
                 injector=None, ledger=None, events: Callable[[dict], None] | list | None = None,
                 rto_s: float | None = None, grace_s: float | None = None,
                 checksum: bool | str = True, oversubscribed: bool = False,
                 traffic: Traffic | None = None, tracer: NoTrace = OFF):
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.deadline_s = float(deadline_s)
        self.comm = comm = duplicate(comm, self.deadline_s)
        self.oversubscribed = oversubscribed
        self.rto_s = float(rto_s) if rto_s is not None else min(0.05, self.deadline_s / 10)
        self.grace_s = float(grace_s) if grace_s is not None else grace_for(self.deadline_s)
        self.ledger = ledger
        self.emit = events.append if isinstance(events, list) else events
        self.traffic = traffic if traffic is not None else Traffic(self.rank, self.size)
        self.tracer = tracer
        self.outbox = Outbox(comm)
        self._inflight = self.outbox.pending  # (request, buffer): appended to on every send
        summer, self._sum_flag = checksum_kind(checksum)
        self.delivery = make_delivery(delivery, self, summer is not None, self.rto_s)
        self._sum: Callable[[Any], int] = summer or (lambda data: 0)
        self.use_crc = self.delivery.checksums
        self.payloads = Payloads(self, running_kind(checksum) if self.use_crc else None)
        self.last_sum: int | None = None  # see recv
        self.agreement = Agreement(comm, deadline_s=self.deadline_s, grace_s=self.grace_s,
                                   retransmits=self.delivery.retransmits,
                                   post=self.outbox.post_control, ledger=ledger)
        self.faults = FaultMechanics(injector, self) if injector is not None else NoFaults()
        self._mechanics = (  # the fault path of a send: None (no injector) costs one test
            self.faults if isinstance(self.faults, FaultMechanics) else None)
        self._borrows = self.delivery.borrows
        self._spin = spin_budget(0, oversubscribed)
        p = self.size
        self._send_seq, self._recv_seq = [0] * p, [0] * p  # next sequence number per peer
        self._stash: list[dict[int, tuple[tuple, np.ndarray]]] = [{} for _ in range(p)]
        self._borrowed: list[tuple[Any, np.ndarray, int]] = []  # (request, payload, dst)
        self._rbuf = np.empty(HDR_BYTES + INLINE_MAX, np.uint8)  # headers, inline packets
        self._status = MPI.Status()
        self.lost: list[MessageId] = []
        self.stats: dict[str, float] = dict(
            sent=0, received=0, bytes_sent=0, retransmissions=0, recovery_s=0.0,
            stale_discarded=0, out_of_order_discarded=0, corrupt_detected=0, lost=0, wait_s=0.0)
        self._wait_s = 0.0  # this collective's wait, and per peer (see collective_wait)
        self._wait_by_peer: dict[int, float] = {}

    # ------------------------------------------------------------------ send
    def send(self, mid: MessageId, payload: np.ndarray, borrow: bool = False,
             checksum: int | None = None) -> None:
        """Send ``payload`` (1-D contiguous) as message ``mid`` (mid.src must be this rank).

        Never blocks.  By default the payload is copied at once, so the caller may
        overwrite it immediately.  With ``borrow=True`` a large payload may be sent
        straight from the caller's memory (strict delivery, no fault on this message):
        the caller must then not modify it before :meth:`settle` (or :meth:`drain`,
        which settles) has returned.  ``checksum``: the payload's checksum when the caller
        has it from this transport (:attr:`last_sum`), so it is not computed again.
        """
        dst = mid.dst
        seq = self._send_seq[dst]
        self._send_seq[dst] = seq + 1
        data = payload.view(np.uint8)
        n = data.size
        if mid.layer >= 0:  # gradient payload (a fence is the transport's own)
            self.traffic.sent(dst, mid.layer, n)
        if self.tracer.on:
            self.tracer.sent(mid, seq, n)
        crc = 0 if not self.use_crc else checksum if checksum is not None else self._sum(data)
        hit = None
        mechanics = self._mechanics
        if mechanics is not None and mid.algorithm != "fence":
            hit = mechanics.decide(mid, n)
        lent = False
        if n <= INLINE_MAX:  # one message: header and a copy of the payload
            pkt: Packet = (b"".join((pack_header(mid, seq, crc, n, self._sum_flag), data)), None)
        else:  # header, then the payload: zero-copy where allowed
            lent = borrow and hit is None and self._borrows
            pkt = (pack_header(mid, seq, crc, n, self._sum_flag | F_SPLIT),
                   data if lent else data.copy())
        if hit is None:
            self.delivery.on_send(dst, seq, pkt)
            self.transmit(dst, pkt, lent)
        else:
            assert mechanics is not None
            mechanics.send(mid, seq, pkt, payload.dtype, hit)

    def transmit(self, dst: int, pkt: Packet, lent: bool = False, spare: bool = False) -> None:
        """Put packet ``pkt`` on the network to ``dst`` (no delivery bookkeeping: see send).

        A split payload follows its header in segments (:mod:`~mpitrain.comm.segments`) on
        the same (source, tag, communicator), which MPI's non-overtaking rule keeps in
        order; ``lent``: it is the caller's memory, which :meth:`settle` waits for.
        ``spare``: a copy the peer never needs (a duplicate's second), which nothing waits
        for (see :mod:`~mpitrain.comm.outbox`).
        """
        head, body = pkt
        comm = self.comm
        sends = self.outbox.spare if spare else self._inflight
        sends.append((comm.Isend(head, dst, TAG_DATA), head))
        nb = len(head)
        if body is not None:
            sent = post_segments(comm, body, dst)
            if lent:
                self._borrowed.extend((q, part, dst) for q, part in sent)
            else:
                sends.extend(sent)
            nb += body.size
        stats = self.stats
        stats["sent"] += 1
        stats["bytes_sent"] += nb
        if self._mechanics is not None:
            self._mechanics.after_transmit(dst)

    def settle(self) -> None:
        """Wait until every payload sent with ``borrow=True`` has left the caller's memory.

        Deadline-guarded like a receive: a peer that takes no delivery within the
        deadline (dead, or failing) ends in the agreed SyncError, never a hang.
        """
        b = self._borrowed
        if b:
            b[:] = [e for e in b if not e[0].Test()]
        if not b:
            return
        wait = Waiter(self.deadline_s, spin_budget(sum(e[1].size for e in b), self.oversubscribed))
        agreement = self.agreement
        while b:
            agreement.waiting = (None, b[0][2], wait.t0)
            self._background()
            now = time.monotonic()
            if now > wait.deadline:
                agreement.report_wait(None, b[0][2], now - wait.t0)
            wait.pause(now)
            b[:] = [e for e in b if not e[0].Test()]
        agreement.waiting = None

    # --------------------------------------------------------------- receive
    def recv(self, mid: MessageId, dtype, count: int, out: np.ndarray | None = None,
             add_to: np.ndarray | None = None) -> np.ndarray | None:
        """Receive message ``mid`` (mid.dst must be this rank): ``count`` items of ``dtype``.

        Into ``out`` (a contiguous array of ``count`` items of ``dtype``), added into
        ``add_to`` (the same, element by element), returning that array; with neither, a
        view of the payload valid until the next ``recv``.  :attr:`last_sum`: the checksum
        of the returned ``out`` / ``add_to`` where known without another pass, for ``send``.
        None in lossy mode when the message did not arrive within the deadline (``out``
        left as it was, or partly written).  Raises SyncError (strict: maybe after adding
        into ``add_to``; reliable) as described in :mod:`mpitrain.comm.agreement`.
        """
        src = mid.src
        seq = self._recv_seq[src]
        self._recv_seq[src] = seq + 1
        nbytes = count * (dtype.itemsize if isinstance(dtype, np.dtype) else np.dtype(dtype).itemsize)
        stash, dest, self.last_sum = self._stash[src], (out, add_to), None
        if stash:
            ent = stash.pop(seq, None)
            if ent is not None:
                got = self._accept(mid, seq, nbytes, ent[0], ent[1], dest)
                if got is _ABSENT:
                    self.delivery.absent(mid)
                    return None
                if got is not None:
                    return got.view(dtype)
        wait = Waiter(self.deadline_s, self._spin)
        comm, status, agreement, polls = self.comm, self._status, self.agreement, 0
        agreement.waiting = (mid, src, wait.t0)
        while True:
            msg = comm.Improbe(src, TAG_DATA, status)
            if msg is not None:
                size = status.Get_count(MPI.BYTE)
                rbuf = self._rbuf
                if size > rbuf.size:
                    rbuf = self._rbuf = np.empty(size, np.uint8)
                msg.Recv([rbuf, size, MPI.BYTE])
                hdr = HEADER.unpack_from(rbuf)
                body = None if hdr[H_FLAGS] & F_SPLIT else rbuf[HDR_BYTES:size]
                got = self._accept(mid, seq, nbytes, hdr, body, dest)
                if got is not None:
                    self._note_wait(src, wait.t0)
                    agreement.waiting = None
                    if got is _ABSENT:
                        self.delivery.absent(mid)
                        return None
                    return got.view(dtype)
                polls = 0
                continue
            polls += 1
            if polls & CHECK_MASK:  # the other duties run every CHECK_EVERY-th poll
                continue
            self._background()
            now = time.monotonic()
            if now > wait.deadline and not self.delivery.deadline_moved(wait):
                self._note_wait(src, wait.t0)
                agreement.waiting = None
                self.delivery.on_timeout(mid, now - wait.t0)  # raises, or counts it absent
                return None
            wait.pause(now)

    def sendrecv(self, send_mid: MessageId, payload: np.ndarray, recv_mid: MessageId,
                 dtype, count: int, out: np.ndarray | None = None,
                 borrow: bool = False) -> np.ndarray | None:
        """``send`` then ``recv`` (the send never blocks, so pairs cannot deadlock)."""
        self.send(send_mid, payload, borrow)
        return self.recv(recv_mid, dtype, count, out)

    def _note_wait(self, src: int, t0: float) -> None:
        w = time.monotonic() - t0
        self.stats["wait_s"] += w
        self._wait_s += w
        self._wait_by_peer[src] = self._wait_by_peer.get(src, 0.0) + w

    def _accept(self, mid: MessageId, seq: int, nbytes: int, hdr: tuple,
                body: np.ndarray | None, dest: tuple[np.ndarray | None, np.ndarray | None]):
        """Classify an arrived packet: the payload (``out``, ``add_to`` or a uint8 view) if
        it is the wanted one, _ABSENT for a tombstone, else None.

        ``body`` is the payload already at hand, or None when it follows in segments (it
        is then always received here, so the channel stays in step).  ``dest``: recv's
        (out, add_to).
        """
        s, src = hdr[H_SEQ], mid.src
        if s != seq:
            if body is None:  # take the payload off the channel
                body = self.payloads.receive(mid, hdr[H_NBYTES], None if s < seq else
                                             np.empty(hdr[H_NBYTES], np.uint8))[0]
            if s < seq:  # duplicate, retransmission already had, or late after its deadline
                self.stats["stale_discarded"] += 1
                self.delivery.on_stale(src, seq)
            elif self.delivery.keep_early(src, seq):  # arrived before an earlier one
                self._stash[src][s] = (hdr, body if hdr[H_FLAGS] & F_SPLIT else body.copy())
            return None
        if hdr[H_FLAGS] & F_DROPPED:
            return _ABSENT
        problem = header_problem(hdr, mid, seq, nbytes, body, self._sum_flag)
        if problem is not None:
            self.agreement.fail_mismatch(problem, mid, hdr)
        body, crc = self._land(mid, nbytes, body, *dest)
        if self.use_crc and crc != hdr[H_CRC]:
            self.stats["corrupt_detected"] += 1
            self.last_sum = None
            if self.tracer.on:
                self.tracer.corrupt(mid)
            return self.delivery.on_corrupt(mid, seq)
        self.stats["received"] += 1
        if mid.layer >= 0:
            self.traffic.received(nbytes)
        if self.tracer.on:
            self.tracer.accepted(mid, seq, nbytes)
        self.delivery.on_received(src, seq)
        add_to = dest[1]
        if add_to is None or body is add_to:  # (added while landing)
            return body
        return np.add(add_to, body.view(add_to.dtype), out=add_to)  # verified, then added

    def _land(self, mid: MessageId, nbytes: int, body: np.ndarray | None,
              out: np.ndarray | None, add_to: np.ndarray | None) -> tuple[np.ndarray, int]:
        """The wanted payload where recv wants it (into ``out``; into ``add_to`` at once where
        a corrupted message ends the collective, see :mod:`~mpitrain.comm.segments`, else
        left to add once verified) and its checksum (0: off); sets :attr:`last_sum`."""
        if body is not None:  # inline: small, at hand
            if out is not None:
                out.view(np.uint8)[:] = body
                body = out.view(np.uint8)
            return body, self._sum(body) if self.use_crc else 0
        fused = add_to if not self.delivery.retransmits else None
        body, crc, summed = self.payloads.receive(
            mid, nbytes, out.view(np.uint8) if out is not None else None, fused)
        if self.use_crc:
            self.last_sum = summed if fused is not None else crc if out is not None else None
        return body, crc

    # ------------------------------------------------------------ background
    def _background(self) -> None:
        """One round of everything that must progress while a rank waits."""
        self.agreement.check()
        self.delivery.background()
        self.faults.release_due()

    def drain(self) -> None:
        """Finish this rank's side of the messages sent so far.

        Sends delayed/held messages once due and, in reliable mode, waits until
        every message is acknowledged (retransmitting as needed).  Called by the
        allreducers at the end of every collective, so no message of a
        collective depends on its sender coming back later.
        """
        if self._borrowed:
            self.settle()
        self.outbox.prune()
        peer = self.delivery.unacked_peer()
        if peer is None and not self.faults.pending():
            return
        wait = Waiter(self.deadline_s, self._spin)
        while peer is not None or self.faults.pending():
            self.agreement.waiting = (None, peer, wait.t0) if peer is not None else None
            self._background()
            now = time.monotonic()
            if now > wait.deadline and peer is not None:
                self.agreement.report_wait(None, peer, now - wait.t0)
            wait.pause(now)
            peer = self.delivery.unacked_peer()
        self.agreement.waiting = None

    # ------------------------------------------------------- collectives
    def begin_collective(self, step: int, layer: int, algorithm: str) -> None:
        """Hook at the start of every collective (all algorithms, native too).

        Resets the per-collective wait attribution, checks the error channel and
        applies "slow" and "crash" rules for this rank.
        """
        self._wait_s = 0.0
        self._wait_by_peer = {}
        self.agreement.check()
        self.faults.begin_collective(step, layer, algorithm)

    def add_wait(self, seconds: float) -> None:
        """Count ``seconds`` blocked outside the transport (a native collective's wait) in
        the current collective's wait."""
        self._wait_s += seconds

    def collective_wait(self) -> tuple[float, int | None]:
        """Seconds this rank waited in the current collective (since begin_collective), and
        the peer it waited on longest (None: no peer)."""
        peers = self._wait_by_peer
        return self._wait_s, (max(peers, key=peers.__getitem__) if peers else None)

    def faults_told(self, step: int) -> list[str]:
        """The injected faults that senders told this rank of, on messages of ``step``."""
        return self.agreement.faults_told(step)

    def evidence(self, step: int) -> StepEvidence:
        """What the end-to-end checks of ``step`` need: messages counted absent, whether
        messages carry checksums, the injected faults this rank was told of in ``step``."""
        return StepEvidence(self.lost, self.use_crc, self.faults_told(step))

    def fence(self, step: int) -> None:
        """Deadline-guarded barrier built from transport messages (dissemination).

        Call it (on every rank) before a native collective that follows own-
        algorithm traffic: a rank that finished early then learns about another
        rank's failure here instead of blocking forever in MPI.
        """
        self.drain()
        p, r, k = self.size, self.rank, 0
        empty = np.empty(0, np.uint8)
        while (1 << k) < p:
            to, frm = (r + (1 << k)) % p, (r - (1 << k)) % p
            self.send(MessageId(step, -1, "fence", "fence", k, r, to), empty)
            self.recv(MessageId(step, -1, "fence", "fence", k, frm, r), np.uint8, 0)
            k += 1
        self.drain()

    def close(self) -> None:
        """Collective, the last call on every rank: flush delayed messages, (reliable) wait
        for acknowledgements, take what the peers still sent (a spare copy, an
        acknowledgement, a notice) and wait until this rank's own sends have left their
        buffers (at most ``deadline_s``; :mod:`~mpitrain.comm.closing`)."""
        self.drain()
        close(self.comm, self.deadline_s, self._spin, self.outbox)
