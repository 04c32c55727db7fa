"""The transport: the ONE place every point-to-point message of the harness passes.

Messages
    Every data message travels on the harness's duplicated communicator with
    tag :data:`TAG_DATA`, as a 96-byte int64 header carrying a per-channel
    sequence number, the full :class:`MessageId` (step, layer, algorithm, phase,
    chunk, src, dst), the payload length, a checksum of the payload (CRC-32C,
    hardware-accelerated through the ``crc32c`` package; zlib's CRC-32 if it is
    missing, flagged in the header so mixed ranks are reported, not misread;
    none with ``checksum=False``, which trusts MPI's own delivery and saves
    two checksum passes per byte -- a third of a large allreduce's time here)
    and flags.  Payloads up to :data:`INLINE_MAX` bytes are copied behind the
    header into one MPI message.  Larger payloads follow the header as a second
    MPI message on the same (source, tag, communicator): MPI's non-overtaking
    rule keeps the pair in order, the receiver always takes the payload right
    after its header, and receives it straight into its destination (``out``)
    or a reused scratch buffer.  In strict delivery a large payload is sent
    straight from the caller's buffer (``send(..., borrow=True)``, then
    :meth:`Transport.settle` before the buffer is written again); reliable
    delivery keeps a copy for retransmission, and a faulted message is copied.
    Both sides of a channel
    (src -> dst) count messages in program order, so the receiver knows which
    sequence number it wants: an older one is stale (a duplicate or a message
    that arrived after its deadline) and is discarded; a newer one arrived early
    (reordered) and is stashed.  A message can therefore never be taken for
    another, and the tag space stays tiny (portable: tags < 32767).

Delivery modes (``delivery=``)
    strict   every receive has a deadline; a missing or (checksums on) corrupted
             message makes every rank raise the same :class:`SyncError` (see below).
    lossy    a message missing at its deadline counts as absent: ``recv``
             returns None and the algorithm adds zeros; no checksums (corruption
             flows into the result, as on a network without them).  A "drop"
             fault sends a header-only tombstone instead of the message, so the
             receiver counts it absent at once: drops cost no waiting, replay
             exactly and cannot make other ranks time out.  Messages late
             beyond the deadline (delay faults, slow ranks) count as absent by
             timeout.  Every
             absent message is appended to :attr:`Transport.lost`.
    reliable go-back-N: sequence numbers, CRC, cumulative acknowledgements on
             :data:`TAG_ACK`, retransmission of everything unacknowledged after
             ``rto_s``.  The receiver discards out-of-order and corrupted
             messages and re-acknowledges stale ones.  Results are bitwise those
             of a fault-free run.  Costs are counted in :attr:`Transport.stats`.

Waiting
    Receives poll (``Improbe``), spinning for :data:`SPIN_S` (plus the time a
    payload being copied needs at 1 GB/s; only :data:`SPIN_S_SHARED` on an
    oversubscribed node, where the peer we wait for may need our core) and then
    sleeping about an eighth of the time waited so far (at most 1 ms).  While
    polling, the transport also watches the error channel, acknowledgements,
    retransmission timers and delayed messages.

Errors (strict and reliable)
    The rank that detects a failure (deadline passed, checksum mismatch,
    protocol mismatch) sends a report on :data:`TAG_ERROR` to every other rank.
    A rank blocked in the transport when a report arrives adds its own report
    (what it waits on, for how long).  Every rank then collects reports for
    ``grace_s`` and raises the best one, by the same rule everywhere: an
    injected fault the sender told about (the sender posts a notice on
    :data:`TAG_NOTICE` for every fault it injects) beats a plain timeout; then
    a wait on a rank that sent no report itself (dead, or the culprit) beats a
    wait on a rank that is itself stuck; then the longest wait; then the lowest
    reporter.  So every rank raises the same SyncError with ``reporter`` = the
    detecting rank, within ``deadline_s + grace_s`` of the fault.  A rank that
    is not inside a transport call sees the report at its next one (every
    collective start checks); :meth:`Transport.fence` is a deadline-guarded
    barrier to call before any native collective that follows own-algorithm
    traffic, so no rank blocks in MPI while the others are failing.

Faults are injected at the sender (``injector``); with ``injector=None`` the
send path costs one ``is None`` test more than a bare send.
"""
from __future__ import annotations

import heapq
import os
import struct
import sys
import time
import zlib
from typing import Any, Callable, NamedTuple

import numpy as np
from mpi4py import MPI

from mpitrain.comm.faults import CRASH_EXIT_CODE, describe
from mpitrain.errors import SyncError

try:  # CRC-32C in hardware (SSE4.2 / ARMv8 CRC): ~23 GB/s here, against ~1.3-4 GB/s for zlib.crc32
    from crc32c import crc32c as _checksum
    _CRC32C = True
except ImportError:  # pragma: no cover - crc32c is a dependency; keep working without it
    _checksum = zlib.crc32
    _CRC32C = False

TAG_DATA, TAG_ACK, TAG_NOTICE, TAG_ERROR, TAG_LOSS = 7001, 7002, 7003, 7004, 7005
DELIVERY_MODES = ("strict", "lossy", "reliable")
ALGORITHM_CODES = {"ring": 1, "recursive_doubling": 2, "tree": 3, "fence": 4, "p2p": 5}
PHASE_CODES = {"reduce_scatter": 1, "allgather": 2, "exchange": 3, "reduce": 4,
               "broadcast": 5, "fence": 6, "p2p": 7}
_MAGIC = 0x6D7074726E  # "mptrn"
_HDR_WORDS = 12
_HDR_BYTES = 8 * _HDR_WORDS
# header word indices
_H_MAGIC, _H_SEQ, _H_STEP, _H_LAYER, _H_ALG, _H_PHASE, _H_CHUNK, _H_SRC, _H_DST, _H_CRC, _H_NBYTES, _H_FLAGS = range(12)
_F_DROPPED = 1  # lossy mode: a tombstone in place of a dropped message
_F_SPLIT = 2    # the payload follows as its own message (same source, tag and communicator)
_F_CRC32C = 4   # the checksum is CRC-32C (else zlib's CRC-32); all ranks must agree
_F_NOSUM = 8    # checksums are off (checksum=False): the CRC word is not set
_SUM_FLAGS = _F_CRC32C | _F_NOSUM
_HDR = struct.Struct("=12q")
INLINE_MAX = 16384  # payloads up to this size travel inside the header's message (one copy)
_ABSENT = object()
_KEEP_ALIVE: list = []  # (request, buffer) of sends that never completed: MPI may still read them
_HOLD_S = 0.02  # a "reorder" fault holds a message at most this long


class MessageId(NamedTuple):
    """Identity of one point-to-point message of a collective."""

    step: int
    layer: int
    algorithm: str
    phase: str
    chunk: int
    src: int
    dst: int

    def where(self) -> str:
        return (f"step {self.step}, layer {self.layer}, {self.algorithm} {self.phase}, "
                f"chunk {self.chunk}, message {self.src}->{self.dst}")


SPIN_S = 2e-4           # poll without sleeping this long before the first sleep ...
SPIN_S_PER_BYTE = 1e-9  # ... plus this per byte of a payload in the middle of its copy
SPIN_S_SHARED = 2e-5    # ... or only this on an oversubscribed node (more ranks than cores)


def spin_budget(nbytes: int = 0, oversubscribed: bool = False) -> float:
    """How long to poll without sleeping while waiting for ``nbytes`` to arrive (or leave).

    Not capped: a payload's copy takes about this long, and sleeping in it stalls it.  The
    waits keep watching the error channel and their deadline while they spin.

    Measured at P = 4 on 2 cores: spinning through copies made the own algorithms 2-3x
    slower than a short spin (the peer we wait for could not run); at P = 2 on 2 cores
    the long spin made a 4 MiB ring 15% faster.
    """
    return SPIN_S_SHARED if oversubscribed else SPIN_S + SPIN_S_PER_BYTE * nbytes


def idle_pause(waited: float, spin_s: float = SPIN_S) -> bool:
    """Pause between two idle polls, ``waited`` seconds into a wait; True if it slept.

    Spin first: a sleep, however short, costs ~80 us here (a small message's whole
    latency), and a rank asleep stalls a shared-memory copy, which only advances inside
    its own MPI calls (measured: a 4 MiB ring allreduce 0.86x native with a 64-poll spin,
    0.98x spinning through the copy).  Past ``spin_s``, sleep 1/8 of the time waited so
    far, at most 1 ms: at most ~12% added latency, and the core goes to the peer we wait
    for on an oversubscribed node.
    """
    if waited <= spin_s:
        return False
    time.sleep(min(1e-3, 0.125 * waited))
    return True


class Transport:
    """Point-to-point messaging with deadlines, checksums and fault hooks.

    Must be created collectively (same arguments, same order of messages) on
    every rank of ``comm``; ``comm`` should be the harness's own duplicate so
    no other traffic shares its tags.  Not thread-safe.

    ``events``: a callable or a list receiving event dicts ("fault" events come
    from the injector; the transport adds ``{"event": "lost", ...}`` in lossy
    mode).  ``ledger``: a :class:`~mpitrain.comm.ledger.Ledger` flushed when a
    SyncError is raised.
    """

    def __init__(self, comm, *, delivery: str = "strict", deadline_s: float = 10.0,
                 injector=None, ledger=None, events: Callable[[dict], None] | list | None = None,
                 rto_s: float | None = None, grace_s: float | None = None,
                 checksum: bool = True, oversubscribed: bool = False):
        if delivery not in DELIVERY_MODES:
            raise ValueError(f"delivery must be one of {DELIVERY_MODES}, not {delivery!r}")
        if delivery == "reliable" and not checksum:
            raise ValueError("reliable delivery needs checksums (it resends corrupted messages)")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.delivery = delivery
        self.reliable = delivery == "reliable"
        self.use_crc = checksum and delivery != "lossy"
        self.deadline_s = float(deadline_s)
        self.oversubscribed = oversubscribed
        self.rto_s = float(rto_s) if rto_s is not None else min(0.05, self.deadline_s / 10)
        self.grace_s = float(grace_s) if grace_s is not None else min(1.0, max(0.25, self.deadline_s / 10))
        self.injector = injector
        self.ledger = ledger
        self.emit = events.append if isinstance(events, list) else events
        p = self.size
        self._send_seq = [0] * p
        self._recv_seq = [0] * p
        self._stash: list[dict[int, np.ndarray]] = [{} for _ in range(p)]
        self._inflight: list[tuple[Any, Any]] = []           # (request, buffer kept alive)
        self._deferred: list[tuple[float, int, int, int, np.ndarray]] = []  # heap (t_due, n, dst, seq, pkt)
        self._held: dict[int, tuple[float, int, np.ndarray]] = {}           # dst -> (t_release, seq, pkt)
        self._unacked: list[dict[int, list]] = [{} for _ in range(p)]       # seq -> [pkt, t_sent, t_first, tries]
        self._loss_heard = float("-inf")  # monotonic time a loss was last announced (lossy)
        self._waiting: tuple | None = None  # (MessageId or None, peer, t0) while blocked
        self._notices: dict[tuple, dict] = {}
        self._crash_notices: dict[int, dict] = {}
        self._ack_buf = np.zeros(1, np.int64)
        self._crcflag = (_F_CRC32C if _CRC32C else 0) if checksum else _F_NOSUM
        # zero-copy sends only where nothing may need the payload after the send: strict
        # delivery (reliable keeps a copy to resend; a lossy receiver may give up on a message,
        # which would leave its sender waiting in settle)
        self.borrow_ok = delivery == "strict"
        self._borrowed: list[tuple[Any, np.ndarray, int]] = []  # (request, payload, dst)
        self._rbuf = np.empty(_HDR_BYTES + INLINE_MAX, np.uint8)  # headers, inline packets
        self._scratch = np.empty(0, np.uint8)  # split payloads received without ``out``
        self._status = MPI.Status()
        self._n = 0
        self.lost: list[MessageId] = []
        self.stats: dict[str, float] = dict(
            sent=0, received=0, bytes_sent=0, retransmissions=0, recovery_s=0.0,
            stale_discarded=0, out_of_order_discarded=0, corrupt_detected=0, lost=0, wait_s=0.0)
        # per-collective wait attribution, reset by begin_collective (for the ledger)
        self.cur_wait_s = 0.0
        self.cur_wait_by_peer: dict[int, float] = {}

    # ------------------------------------------------------------------ send
    def _header(self, mid: MessageId, seq: int, crc: int, n: int, flags: int) -> bytes:
        return _HDR.pack(_MAGIC, seq, mid.step, mid.layer, ALGORITHM_CODES[mid.algorithm],
                         PHASE_CODES[mid.phase], mid.chunk, mid.src, mid.dst, crc, n,
                         flags | self._crcflag)

    def send(self, mid: MessageId, payload: np.ndarray, borrow: bool = False) -> None:
        """Send ``payload`` (1-D contiguous) as message ``mid`` (mid.src must be this rank).

        Never blocks.  By default the payload is copied at once, so the caller may
        overwrite it immediately.  With ``borrow=True`` a large payload may be sent
        straight from the caller's memory (strict delivery, no fault on this message):
        the caller must then not modify it before :meth:`settle` (or :meth:`drain`,
        which settles) has returned.
        """
        dst = mid.dst
        seq = self._send_seq[dst]
        self._send_seq[dst] = seq + 1
        data = payload.view(np.uint8)
        n = data.size
        crc = _checksum(data) if self.use_crc else 0
        hit = None
        if self.injector is not None and mid.algorithm != "fence":
            hit = self.injector.message_fault(mid, n)
        if n <= INLINE_MAX:  # one message: header and a copy of the payload
            pkt = (b"".join((self._header(mid, seq, crc, n, 0), data)), None)
        elif borrow and hit is None and self.borrow_ok:  # zero-copy: header, then the payload
            head = self._header(mid, seq, crc, n, _F_SPLIT)
            comm = self.comm
            self._inflight.append((comm.Isend(head, dst, TAG_DATA), head))
            self._borrowed.append((comm.Isend(data, dst, TAG_DATA), data, dst))
            stats = self.stats
            stats["sent"] += 1
            stats["bytes_sent"] += _HDR_BYTES + n
            if self._held:
                held = self._held.pop(dst, None)
                if held is not None:
                    self._release(dst, held[1], held[2])
            return
        else:
            pkt = (self._header(mid, seq, crc, n, _F_SPLIT), data.copy())
        if hit is None:
            self._transmit(dst, seq, pkt)
        else:
            self._send_with_faults(mid, seq, pkt, payload.dtype, hit)

    def _transmit(self, dst: int, seq: int, pkt: tuple, *, wire: tuple | None = None,
                  register: bool = True) -> None:
        """Put ``wire`` (default ``pkt``) on the network; in reliable mode keep ``pkt`` for resending.

        A packet is ``(head, body)``: ``head`` the header (with the payload inline when
        ``body`` is None), ``body`` a payload that follows as a second message on the same
        (source, tag, communicator), which MPI's non-overtaking rule keeps in order.
        """
        if self.reliable and register:
            now = time.monotonic()
            self._unacked[dst][seq] = [pkt, now, now, 0]
        head, body = pkt if wire is None else wire
        comm = self.comm
        self._inflight.append((comm.Isend(head, dst, TAG_DATA), head))
        nb = len(head)
        if body is not None:
            self._inflight.append((comm.Isend(body, dst, TAG_DATA), body))
            nb += body.size
        self.stats["sent"] += 1
        self.stats["bytes_sent"] += nb
        held = self._held.pop(dst, None) if self._held else None
        if held is not None:  # a reordered message goes right after the next one
            self._release(dst, held[1], held[2])

    def _release(self, dst: int, seq: int, pkt: tuple) -> None:
        """Send a delayed/held message.  Its retransmission state was created at send
        time; it may already be acknowledged (a retransmission got there first)."""
        entry = self._unacked[dst].get(seq) if self.reliable else None
        if entry is not None and entry[1] is None:
            entry[1] = time.monotonic()
        self._transmit(dst, seq, pkt, register=False)

    def _send_with_faults(self, mid: MessageId, seq: int, pkt: tuple, dtype, hit) -> None:
        kind, dst, now = hit.rule.kind, mid.dst, time.monotonic()
        self._post_control(dst, TAG_NOTICE, {"mid": tuple(mid), "fault": hit.event})
        if self.reliable:  # the original counts as sent now: the rto clock starts
            self._unacked[dst][seq] = [pkt, None if kind in ("delay", "reorder") else now, now, 0]
        if kind == "drop":
            if self.delivery == "lossy":  # tell the receiver at once: no waiting, no cascade
                f = list(_HDR.unpack_from(pkt[0]))
                f[_H_FLAGS] = (f[_H_FLAGS] & ~_F_SPLIT) | _F_DROPPED
                self._transmit(dst, seq, (_HDR.pack(*f), None), register=False)
            return
        if kind == "corrupt":
            self._transmit(dst, seq, pkt, wire=self._corrupted(pkt, dtype, hit), register=False)
        elif kind == "duplicate":
            self._transmit(dst, seq, pkt, register=False)
            self._transmit(dst, seq, pkt, register=False)
        elif kind == "delay":
            self._n += 1
            heapq.heappush(self._deferred, (now + hit.rule.delay_ms / 1e3, self._n, dst, seq, pkt))
        elif kind == "reorder":
            old = self._held.pop(dst, None)
            if old is not None:
                self._release(dst, old[1], old[2])
            self._held[dst] = (now + _HOLD_S, seq, pkt)

    @staticmethod
    def _corrupted(pkt: tuple, dtype, hit) -> tuple:
        """A corrupted copy of ``pkt`` (the header, with the original checksum, is kept)."""
        head, body = pkt
        if body is None:
            head = np.frombuffer(head, np.uint8).copy()
            body = head[_HDR_BYTES:]
        else:
            body = body.copy()
        if hit.rule.corrupt == "nan" and np.dtype(dtype).kind == "f":
            vals = body.view(dtype)
            vals[hit.pick % vals.size] = np.nan
        else:
            bit = hit.pick % (body.size * 8)
            body[bit // 8] ^= np.uint8(1 << (bit % 8))
        return (head, None) if pkt[1] is None else (head, body)

    def _post_control(self, dst: int, tag: int, obj: Any) -> None:
        """Small pickled control message; never waited on (the peer may be dead)."""
        self._inflight.append((self.comm.isend(obj, dst, tag), None))

    def settle(self) -> None:
        """Wait until every payload sent with ``borrow=True`` has left the caller's memory.

        Deadline-guarded like a receive: a peer that takes no delivery within the
        deadline (dead, or failing) ends in the agreed SyncError, never a hang.
        """
        b = self._borrowed
        if not b or MPI.Request.Testall([q for q, _, _ in b]):
            b.clear()
            return
        t0 = time.monotonic()
        spin = spin_budget(sum(e[1].size for e in b), self.oversubscribed)
        while True:
            b[:] = [e for e in b if not e[0].Test()]
            if not b:
                break
            self._waiting = (None, b[0][2], t0)
            self._background()
            waited = time.monotonic() - t0
            if waited > self.deadline_s:
                self._report_wait(None, b[0][2], waited)
            idle_pause(waited, spin)
        self._waiting = None

    # --------------------------------------------------------------- receive
    def recv(self, mid: MessageId, dtype, count: int, out: np.ndarray | None = None
             ) -> np.ndarray | None:
        """Receive message ``mid`` (mid.dst must be this rank): ``count`` items of ``dtype``.

        With ``out`` (a contiguous array of ``count`` items of ``dtype``) the payload is
        received straight into it and ``out`` is returned; without, a view of the
        payload valid until the next ``recv`` is returned.  Returns None in lossy mode
        when the message did not arrive within the deadline (``out`` is then left
        as it was, or partly written).  Raises SyncError (strict, reliable) as
        described in the module docstring.
        """
        src = mid.src
        seq = self._recv_seq[src]
        self._recv_seq[src] = seq + 1
        nbytes = count * (dtype.itemsize if isinstance(dtype, np.dtype) else np.dtype(dtype).itemsize)
        stash = self._stash[src]
        if stash:
            ent = stash.pop(seq, None)
            if ent is not None:
                got = self._accept(mid, seq, nbytes, ent[0], ent[1], out, 0.0)
                if got is _ABSENT:
                    return self._lose(mid)
                if got is not None:
                    return out if out is not None else got.view(dtype)
        t0 = time.monotonic()
        deadline = t0 + self.deadline_s
        comm, status, idle, slept = self.comm, self._status, 0, False
        self._waiting = (mid, src, t0)
        while True:
            msg = comm.Improbe(src, TAG_DATA, status)
            if msg is not None:
                size = status.Get_count(MPI.BYTE)
                rbuf = self._rbuf
                if size > rbuf.size:
                    rbuf = self._rbuf = np.empty(size, np.uint8)
                msg.Recv([rbuf, size, MPI.BYTE])
                hdr = _HDR.unpack_from(rbuf)
                body = None if hdr[_H_FLAGS] & _F_SPLIT else rbuf[_HDR_BYTES:size]
                got = self._accept(mid, seq, nbytes, hdr, body, out, t0)
                if got is not None:
                    self._note_wait(src, t0)
                    self._waiting = None
                    if got is _ABSENT:
                        return self._lose(mid)
                    return out if out is not None else got.view(dtype)
                idle = 0
                continue
            if idle & 7 and not slept:  # spinning: the other checks every 8th poll
                idle += 1
                continue
            self._background()
            now = time.monotonic()
            if now > deadline:
                if self._loss_heard > deadline - self.deadline_s:  # upstream loss: wait again
                    deadline = self._loss_heard + self.deadline_s
                    continue
                self._note_wait(src, t0)
                self._waiting = None
                # A fence is a liveness check, never a lossy message: a missing peer is an
                # error even in lossy mode (the native collectives after it have no deadline).
                if self.delivery == "lossy" and mid.algorithm != "fence":
                    return self._lose(mid)
                self._report_wait(mid, src, time.monotonic() - t0)
            slept = idle_pause(now - t0, spin_budget(0, self.oversubscribed))
            idle += 1

    def sendrecv(self, send_mid: MessageId, payload: np.ndarray, recv_mid: MessageId,
                 dtype, count: int, out: np.ndarray | None = None,
                 borrow: bool = False) -> np.ndarray | None:
        """``send`` then ``recv`` (the send never blocks, so pairs cannot deadlock)."""
        self.send(send_mid, payload, borrow)
        return self.recv(recv_mid, dtype, count, out)

    def _note_wait(self, src: int, t0: float) -> None:
        w = time.monotonic() - t0
        self.stats["wait_s"] += w
        self.cur_wait_s += w
        self.cur_wait_by_peer[src] = self.cur_wait_by_peer.get(src, 0.0) + w

    def _body(self, mid: MessageId, nbytes: int, into: np.ndarray | None) -> np.ndarray:
        """Receive the payload message that follows a header from ``mid.src``."""
        if into is None:
            if self._scratch.size < nbytes:
                self._scratch = np.empty(max(nbytes, 2 * self._scratch.size), np.uint8)
            into = self._scratch[:nbytes]
        req = self.comm.Irecv([into, nbytes, MPI.BYTE], mid.src, TAG_DATA)
        if req.Test():
            return into
        t0, spin, polls = time.monotonic(), spin_budget(nbytes, self.oversubscribed), 0
        while not req.Test():
            polls += 1
            if polls & 7:  # the other checks every 8th poll, spinning or not
                continue
            self._background()
            waited = time.monotonic() - t0
            if waited > self.deadline_s:  # the sender died mid-message
                self._report_wait(mid, mid.src, waited)
            idle_pause(waited, spin)
        return into

    def _accept(self, mid: MessageId, seq: int, nbytes: int, hdr: tuple,
                body: np.ndarray | None, out: np.ndarray | None, t0: float):
        """Classify an arrived packet: the payload (uint8) if it is the wanted one, else None.

        ``body`` is the payload already at hand, or None when it follows as its own
        message (it is then always received here, so the channel stays in step).
        """
        s, src = hdr[_H_SEQ], mid.src
        if s != seq:
            if body is None:  # take the payload off the channel
                body = self._body(mid, hdr[_H_NBYTES], None if s < seq else
                                  np.empty(hdr[_H_NBYTES], np.uint8))
            if s < seq:  # duplicate, retransmission already had, or late after its deadline
                self.stats["stale_discarded"] += 1
                if self.reliable:
                    self._ack(src, seq - 1)
                return None
            # arrived before an earlier one
            if self.reliable:  # go-back-N: the sender will resend it in order
                self.stats["out_of_order_discarded"] += 1
                self._ack(src, seq - 1)
            else:
                self._stash[src][s] = (hdr, body if hdr[_H_FLAGS] & _F_SPLIT else body.copy())
            return None
        flags = hdr[_H_FLAGS]
        if flags & _F_DROPPED:
            return _ABSENT
        if hdr[:9] != (_MAGIC, seq, mid.step, mid.layer, ALGORITHM_CODES[mid.algorithm],
                       PHASE_CODES[mid.phase], mid.chunk, src, mid.dst) \
                or hdr[_H_NBYTES] != nbytes or (body is not None and body.size != nbytes) \
                or (flags & _SUM_FLAGS) != self._crcflag:
            self._mismatch(mid, seq, nbytes, hdr, body)
        dest = out.view(np.uint8) if out is not None else None
        if body is None:
            body = self._body(mid, nbytes, dest)
        elif dest is not None:
            dest[:] = body
            body = dest
        if self.use_crc and _checksum(body) != hdr[_H_CRC]:
            self.stats["corrupt_detected"] += 1
            if self.reliable:
                self._ack(src, seq - 1)
                return None
            self._fail_corrupt(mid)
        self.stats["received"] += 1
        if self.reliable:
            self._ack(src, seq)
        return body

    def _mismatch(self, mid: MessageId, seq: int, nbytes: int, hdr: tuple, body) -> None:
        """The packet in sequence is not ``mid``'s, or its checksum kind differs: fail."""
        src = mid.src
        if hdr[:9] == (_MAGIC, seq, mid.step, mid.layer, ALGORITHM_CODES[mid.algorithm],
                       PHASE_CODES[mid.phase], mid.chunk, src, mid.dst) \
                and hdr[_H_NBYTES] == nbytes and (body is None or body.size == nbytes):
            self._fail(2, f"rank {self.rank} and rank {src} use different message checksums "
                       f"({mid.where()})", "set the same [faults] checksum and install the "
                       "same mpitrain dependencies (crc32c) on every rank")
        self._fail(2, f"rank {self.rank} received a message from rank {src} that is not "
                   f"the one expected ({mid.where()}): header {list(hdr[:11])}",
                   "the ranks do not run the same sequence of collectives "
                   "(different layer sizes, order or algorithm)")

    def _ack(self, src: int, upto: int) -> None:
        buf = np.array([upto], np.int64)
        self._inflight.append((self.comm.Isend(buf, src, TAG_ACK), buf))

    # ------------------------------------------------------------ background
    def _background(self) -> None:
        """One round of everything that must progress while a rank waits."""
        if self.comm.Iprobe(MPI.ANY_SOURCE, TAG_ERROR):
            self._on_remote_error()
        if self.reliable:
            self._drain_acks()
            self._retransmit_due()
        elif self.delivery == "lossy" and self.comm.Iprobe(MPI.ANY_SOURCE, TAG_LOSS):
            st = MPI.Status()
            while self.comm.Iprobe(MPI.ANY_SOURCE, TAG_LOSS, st):
                self.comm.recv(source=st.Get_source(), tag=TAG_LOSS)
            self._loss_heard = time.monotonic()
        if self._deferred or self._held:
            self._release_due()

    def _drain_acks(self) -> None:
        st, buf = MPI.Status(), self._ack_buf
        while self.comm.Iprobe(MPI.ANY_SOURCE, TAG_ACK, st):
            src = st.Get_source()
            self.comm.Recv(buf, src, TAG_ACK)
            upto, pending = int(buf[0]), self._unacked[src]
            if not pending:
                continue
            now = time.monotonic()
            for s in [s for s in pending if s <= upto]:
                entry = pending.pop(s)
                if entry[3]:
                    self.stats["recovery_s"] += now - entry[2]

    def _retransmit_due(self) -> None:
        now = time.monotonic()
        for dst, pending in enumerate(self._unacked):
            if not pending:
                continue
            first = pending[min(pending)]
            if first[1] is not None and now - first[1] < self.rto_s:
                continue
            if first[1] is None and now - first[2] < self.rto_s:
                continue
            for s in sorted(pending):  # go-back-N: resend all unacknowledged, in order
                entry = pending[s]
                entry[1], entry[3] = now, entry[3] + 1
                self.stats["retransmissions"] += 1
                self._transmit(dst, s, entry[0], register=False)

    def _release_due(self) -> None:
        now = time.monotonic()
        while self._deferred and self._deferred[0][0] <= now:
            _, _, dst, seq, pkt = heapq.heappop(self._deferred)
            self._release(dst, seq, pkt)
        for dst in [d for d, h in self._held.items() if h[0] <= now]:
            _, seq, pkt = self._held.pop(dst)
            self._release(dst, seq, pkt)

    def drain(self) -> None:
        """Finish this rank's side of the messages sent so far.

        Sends delayed/held messages once due and, in reliable mode, waits until
        every message is acknowledged (retransmitting as needed).  Called by the
        allreducers at the end of every collective, so no message of a
        collective depends on its sender coming back later.
        """
        if self._borrowed:
            self.settle()
        if len(self._inflight) > 32:
            self._inflight = [(r, b) for r, b in self._inflight if not r.Test()]
        if not (self._deferred or self._held or (self.reliable and any(self._unacked))):
            return
        t0 = time.monotonic()
        while self._deferred or self._held or (self.reliable and any(self._unacked)):
            dst = next((d for d, p in enumerate(self._unacked) if p), None)
            self._waiting = (None, dst, t0) if dst is not None else None
            self._background()
            waited = time.monotonic() - t0
            if waited > self.deadline_s and dst is not None:
                self._report_wait(None, dst, waited)
            idle_pause(waited, spin_budget(0, self.oversubscribed))
        self._waiting = None

    # ---------------------------------------------------------------- faults
    def begin_collective(self, step: int, layer: int, algorithm: str) -> None:
        """Hook at the start of every collective (all algorithms, native too).

        Resets the per-collective wait attribution, checks the error channel and
        applies "slow" and "crash" rules for this rank.
        """
        self.cur_wait_s = 0.0
        self.cur_wait_by_peer = {}
        if self.comm.Iprobe(MPI.ANY_SOURCE, TAG_ERROR):
            self._on_remote_error()
        if self.injector is None:
            return
        for hit in self.injector.collective_faults(step, layer, algorithm):
            if hit.rule.kind == "slow":
                time.sleep(hit.rule.delay_ms / 1e3)
            elif hit.rule.kind == "crash":
                self._crash(hit.event)

    def _crash(self, ev: dict) -> None:
        """Die like a crashed process (os._exit), after telling the others it was injected."""
        for r in range(self.size):
            if r != self.rank:
                self._post_control(r, TAG_NOTICE, {"crash": self.rank, "fault": ev})
        t_end = time.monotonic() + 0.2
        while time.monotonic() < t_end and not all(q.Test() for q, _ in self._inflight):
            time.sleep(1e-3)
        if self.ledger is not None:
            self.ledger.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)

    def faults_told(self, step: int) -> list[str]:
        """The injected faults that senders told this rank of, on messages of ``step``."""
        self._drain_notices()
        self._notices = {mid: note for mid, note in self._notices.items() if mid[0] >= step}
        return [f"{MessageId(*mid).where()}: {describe(note)}"
                for mid, note in self._notices.items() if mid[0] == step]

    def _drain_notices(self) -> None:
        st = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, TAG_NOTICE, st):
            note = self.comm.recv(source=st.Get_source(), tag=TAG_NOTICE)
            if "crash" in note:
                self._crash_notices[note["crash"]] = note["fault"]
            else:
                self._notices[tuple(note["mid"])] = note["fault"]

    # ---------------------------------------------------------------- errors
    def _lose(self, mid: MessageId) -> None:
        """Lossy mode: count ``mid`` as absent."""
        self.lost.append(mid)
        self.stats["lost"] += 1
        for r in range(self.size):
            if r != self.rank:
                self._post_control(r, TAG_LOSS, tuple(mid))
        if self.emit is not None:
            self.emit({"event": "lost", **mid._asdict(), "rank": self.rank, "t": time.time()})
        return None

    def _on_remote_error(self) -> None:
        """Another rank reported a failure: add what this rank is blocked on, then resolve."""
        if self._waiting is None:
            self._resolve(None)
        mid, peer, t0 = self._waiting
        self._report_wait(mid, peer, time.monotonic() - t0)

    def _report_wait(self, mid: MessageId | None, peer: int, waited: float) -> None:
        """Report that this rank has waited ``waited`` s for ``peer`` (a message, or acks)."""
        self._waiting = None
        self._drain_notices()
        if mid is None and not self.reliable:
            what = (f"rank {self.rank}: rank {peer} took no delivery of a message in {waited:.3g} s "
                    f"(deadline {self.deadline_s:g} s)")
            note = self._crash_notices.get(peer)
        elif mid is None:
            what = (f"rank {self.rank}: rank {peer} acknowledged nothing in {waited:.3g} s "
                    f"(deadline {self.deadline_s:g} s) despite retransmission")
            note = self._crash_notices.get(peer)
        else:
            what = (f"step {mid.step}, layer {mid.layer}: rank {self.rank} received nothing from "
                    f"rank {peer} in {waited:.3g} s (deadline {self.deadline_s:g} s; "
                    f"{mid.algorithm} {mid.phase}, chunk {mid.chunk})")
            if self.reliable:
                what += " despite retransmission"
            note = self._notices.get(tuple(mid)) or self._crash_notices.get(peer)
        if note:
            self._fail(2, f"{what}. Injected fault: {describe(note)}.",
                       "the fault plan caused this; use delivery = \"reliable\" to survive "
                       "message faults, or change the plan", waited_on=peer, waited=waited)
        self._fail(1, f"{what}.", f"rank {peer} may have died (crashed or killed) or be stuck; "
                   "look at its output and run `mpitrain diagnose` on the run folder",
                   waited_on=peer, waited=waited)

    def _fail_corrupt(self, mid: MessageId) -> None:
        self._drain_notices()
        note = self._notices.get(tuple(mid))
        msg = (f"step {mid.step}, layer {mid.layer}: rank {self.rank} received a corrupted message "
               f"from rank {mid.src} ({mid.algorithm} {mid.phase}, chunk {mid.chunk}): "
               f"checksum mismatch.")
        if note:
            msg += f" Injected fault: {describe(note)}."
        self._fail(2, msg, "use delivery = \"reliable\" to retransmit corrupted messages")

    def _fail(self, priority: int, message: str, hint: str | None,
              waited_on: int | None = None, waited: float = 0.0) -> None:
        """Report a failure detected on this rank to all ranks, then raise the agreed error."""
        self._waiting = None
        report = {"reporter": self.rank, "priority": priority, "waited_on": waited_on,
                  "waited": waited, "message": message, "hint": hint}
        for r in range(self.size):
            if r != self.rank:
                self._post_control(r, TAG_ERROR, report)
        self._resolve(report)

    def _resolve(self, own: dict | None) -> None:
        """Collect error reports for ``grace_s``, pick the same one as every rank, raise it."""
        reports = {own["reporter"]: own} if own else {}
        st = MPI.Status()
        t_end = time.monotonic() + self.grace_s
        while True:
            while self.comm.Iprobe(MPI.ANY_SOURCE, TAG_ERROR, st):
                rep = self.comm.recv(source=st.Get_source(), tag=TAG_ERROR)
                reports[rep["reporter"]] = rep
            if time.monotonic() >= t_end:
                break
            time.sleep(2e-3)

        def rank_key(rep: dict) -> tuple:
            peer = rep["waited_on"]
            terminal = peer is not None and peer not in reports
            return (rep["priority"], terminal, rep["waited"], -rep["reporter"])

        best = max(reports.values(), key=rank_key)
        if self.ledger is not None:
            self.ledger.flush(error=best["message"])
        raise SyncError(best["message"], hint=best["hint"], reporter=best["reporter"])

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
        """Flush delayed messages, (reliable) wait for acknowledgements, and wait until every
        data send has left its buffer (at most ``deadline_s``).

        MPI reads a send buffer until the request completes; a message released late (delay,
        reorder) may still be in flight when the collective returns.  Freeing its buffer then
        (this object going away, the process finalizing) would send garbage or nothing.  Sends
        still pending after the deadline keep their buffers alive for the process's lifetime.
        """
        self.drain()
        t0 = time.monotonic()
        while True:
            self._inflight = [(q, b) for q, b in self._inflight if not q.Test()]
            if all(b is None for _, b in self._inflight):  # control messages: never waited on
                break
            waited = time.monotonic() - t0
            if waited > self.deadline_s:
                _KEEP_ALIVE.extend(self._inflight)
                break
            idle_pause(waited, spin_budget(0, self.oversubscribed))
