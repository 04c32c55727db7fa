"""Allreduce algorithms: in-place SUM of a 1-D buffer over all ranks.

One :class:`Allreducer` per job (a small strategy object); every rank calls
``start`` for the same collectives, with buffers of the same length and dtype,
in the same order, then ``wait`` (or polls ``test``) on each handle.  The result
is the SUM (the trainer pre-weights gradients by 1/global batch, so the SUM is
the mean), identical bit
for bit on every rank, and deterministic: the same inputs give the same bits
on every run.

native
    ``comm.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM)``: truly non-blocking, so it
    overlaps with the backward pass.  Native MPI cannot be intercepted message
    by message, so message faults (drop, delay, corrupt, duplicate, reorder) do
    NOT act on it; only the per-collective faults "crash" and "slow" do (they
    act at ``start``).  Bitwise agreement across ranks is up to the MPI library.
ring
    Reduce-scatter then allgather around the ring (phases "reduce_scatter",
    "allgather"; chunk c is elements ``[c*n//p, (c+1)*n//p)``, possibly empty).
recursive_doubling
    Full-buffer exchange with partner ``rank ^ 2**k`` (phase "exchange").  With
    p not a power of two, ranks ``>= p2`` (the largest power of two <= p) first
    fold their buffer into rank ``r - p2`` and get the result back at the end.
    ``chunk`` numbers the round: 0 = fold-in, 1..log2(p2) = exchange rounds,
    log2(p2)+1 = fold-out.
tree
    Binomial reduce to rank 0 (phase "reduce"), then binomial broadcast
    (phase "broadcast"); ``chunk`` is the round (log2 of the rank distance).

The ring, recursive-doubling and tree allreducers are built only from
:class:`~mpitrain.comm.transport.Transport` messages and run *synchronously
inside* ``start`` (then ``test`` is True and ``wait`` a no-op): they cannot
overlap with computation, which is the honest price of intercepting every
message in Python.  In lossy mode a missing message contributes zeros.  Chunks are sent
straight from the buffer (``Transport.send(..., borrow=True)``; ``Transport.settle`` before a
sent region is written again) and received straight into the buffer where they replace it.
"""
from __future__ import annotations

import time
import zlib
from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm.transport import Transport
from mpitrain.comm.waiting import Waiter, spin_budget
from mpitrain.comm.wire import MessageId
from mpitrain.errors import SyncError
from mpitrain.schema import ALGORITHMS



FINGERPRINT_ELEMENTS = 4096


def fingerprint(buf: np.ndarray) -> int:
    """CRC-32 of the buffer, or of an even sample of FINGERPRINT_ELEMENTS elements of it.

    The ledger compares results across ranks with it.  A full CRC of every gradient costs
    ~2 ms a step on a 7 MiB model (15-20% of a step); a strided sample still differs when
    any chunk of a ring (n/p contiguous elements) differs, for n/p >= n/4096.
    """
    if buf.size > FINGERPRINT_ELEMENTS:
        buf = np.ascontiguousarray(buf[::buf.size // FINGERPRINT_ELEMENTS])
    return zlib.crc32(buf.view(np.uint8)) if buf.size else 0


def wait_native(request, deadline_s: float, what: str, nbytes: int = 0,
                oversubscribed: bool = False) -> None:
    """Wait for a native MPI request, but raise SyncError after ``deadline_s`` seconds.

    MPI's own Wait never returns if a peer died; polling keeps the harness's promise that
    a missing rank becomes an error, not a hang.  Spins first -- as long as ``nbytes`` take
    to copy at 1 GB/s, since MPICH copies only inside our Test calls, unless the node is
    ``oversubscribed`` -- then sleeps in short steps (the harness's one waiting rule,
    :mod:`mpitrain.comm.waiting`).
    """
    if not Waiter(deadline_s, spin_budget(nbytes, oversubscribed)).wait_for(request):
        raise SyncError(
            f"{what} did not complete within the deadline ({deadline_s:g} s): a rank "
            f"stopped taking part (it may have died or hung)",
            hint="native MPI allreduce cannot say which rank; run with [sync] algorithm "
                 "= \"ring\" (or tree, recursive_doubling) to have the missing peer named, "
                 "and see `mpitrain diagnose OUT`")


class Handle:
    """An in-progress collective (returned by ``start``)."""

    __slots__ = ("buf", "step", "layer", "request", "record", "done")

    def __init__(self, buf: np.ndarray, step: int, layer: int):
        self.buf, self.step, self.layer = buf, step, layer
        self.request: Any = None
        self.record: dict | None = None
        self.done = False


class Allreducer:
    """Base: in-place SUM allreduce of 1-D contiguous buffers (see module docstring).

    ``start(buf, step, layer)`` begins the collective for layer ``layer`` of
    step ``step``; ``buf`` must not be touched until ``wait`` returns (or
    ``test`` returned True).  Steps count from 1, layers from 0 at the input.
    """

    name = "base"

    def __init__(self, comm, transport: Transport | None, ledger=None, deadline_s: float = 10.0,
                 oversubscribed: bool = False):
        self.comm = comm
        self.deadline_s = deadline_s
        self.oversubscribed = oversubscribed
        self.transport = transport
        self.ledger = ledger if ledger is not None else getattr(transport, "ledger", None)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def _enter(self, buf: np.ndarray, step: int, layer: int) -> Handle:
        if buf.ndim != 1 or not buf.flags.c_contiguous:
            raise ValueError("allreduce buffers must be 1-D and C-contiguous")
        if self.transport is not None:  # crash/slow faults, per-collective wait accounting
            self.transport.begin_collective(step, layer, self.name)
        h = Handle(buf, step, layer)
        if self.ledger is not None:
            h.record = self.ledger.enter(step, layer, self.name, buf.nbytes)
        return h

    def _leave(self, h: Handle) -> None:
        h.done = True
        if self.ledger is not None:
            t = self.transport
            wait_s, waited_on = t.collective_wait() if t is not None else (0.0, None)
            self.ledger.leave(h.record, fingerprint(h.buf),
                              wait_s=wait_s, waited_on=waited_on)

    def start(self, buf: np.ndarray, step: int, layer: int) -> Handle:
        h = self._enter(buf, step, layer)
        if buf.size and self.size > 1:
            self._run(buf, step, layer)
        assert self.transport is not None  # own algorithms always have one (make_allreducer)
        self.transport.drain()
        self._leave(h)
        return h

    def test(self, handle: Handle) -> bool:
        return handle.done

    def wait(self, handle: Handle) -> None:
        return None

    def _run(self, buf: np.ndarray, step: int, layer: int) -> None:
        raise NotImplementedError

    def _mid(self, step, layer, phase, chunk, src, dst) -> MessageId:
        return MessageId(step, layer, self.name, phase, chunk, src, dst)


class NativeAllreducer(Allreducer):
    """``MPI.Iallreduce`` (non-blocking; no per-message fault hooks)."""

    name = "native"

    def start(self, buf: np.ndarray, step: int, layer: int) -> Handle:
        h = self._enter(buf, step, layer)
        h.request = self.comm.Iallreduce(MPI.IN_PLACE, buf, MPI.SUM)
        return h

    def test(self, handle: Handle) -> bool:
        if not handle.done and handle.request.Test():
            self._leave(handle)
        return handle.done

    def wait(self, handle: Handle) -> None:
        if not handle.done:
            t0 = time.monotonic()
            wait_native(handle.request, self.deadline_s,
                        f"native allreduce of step {handle.step}, layer {handle.layer}",
                        handle.buf.nbytes, self.oversubscribed)
            if self.transport is not None:
                self.transport.add_wait(time.monotonic() - t0)
            self._leave(handle)


class RingAllreducer(Allreducer):
    """Reduce-scatter then allgather; bandwidth-optimal (2(p-1)/p * n per rank)."""

    name = "ring"

    def _run(self, buf, step, layer):
        t, p, r = self.transport, self.size, self.rank
        n = buf.size
        lo = [(c * n) // p for c in range(p + 1)]
        right, left = (r + 1) % p, (r - 1) % p
        # Chunks are sent straight from ``buf`` (borrow): a chunk sent in the reduce-scatter
        # is only written again by the allgather, after ``settle``; allgather chunks are not
        # written again before the end of the collective (``drain`` settles).  Every chunk
        # sent after the first is the one received (and summed) just before: its checksum
        # is the one the transport computed while receiving (``last_sum``), not a new pass.
        known = None
        for s in range(p - 1):  # after step s, rank r holds the partial sum of chunk r-s-1
            sc, rc = (r - s) % p, (r - s - 1) % p
            t.send(MessageId(step, layer, "ring", "reduce_scatter", sc, r, right),
                   buf[lo[sc]:lo[sc + 1]], True, known)
            seg = buf[lo[rc]:lo[rc + 1]]  # seg += the chunk received
            t.recv(MessageId(step, layer, "ring", "reduce_scatter", rc, left, r), seg.dtype,
                   seg.size, add_to=seg)
            known = t.last_sum
        t.settle()
        for s in range(p - 1):  # rank r owns the full sum of chunk r+1; pass them around
            sc, rc = (r + 1 - s) % p, (r - s) % p
            t.send(MessageId(step, layer, "ring", "allgather", sc, r, right),
                   buf[lo[sc]:lo[sc + 1]], True, known)
            seg = buf[lo[rc]:lo[rc + 1]]
            if t.recv(MessageId(step, layer, "ring", "allgather", rc, left, r), seg.dtype,
                      seg.size, seg) is None:
                seg[:] = 0
            known = t.last_sum


class RecursiveDoublingAllreducer(Allreducer):
    """log2(p) full-buffer exchanges; latency-optimal for small buffers."""

    name = "recursive_doubling"

    def _run(self, buf, step, layer):
        t, p, r = self.transport, self.size, self.rank
        n, dt = buf.size, buf.dtype
        p2 = 1 << (p.bit_length() - 1)
        rounds = p2.bit_length() - 1
        if r >= p2:  # an extra rank: fold in, wait for the result
            t.send(self._mid(step, layer, "exchange", 0, r, r - p2), buf, True)
            t.settle()  # before the result overwrites what was sent from buf
            if t.recv(self._mid(step, layer, "exchange", rounds + 1, r - p2, r), dt, n, buf) is None:
                buf[:] = 0
            return
        if r + p2 < p:  # buf += the extra rank's buffer
            t.recv(self._mid(step, layer, "exchange", 0, r + p2, r), dt, n, add_to=buf)
        for k in range(rounds):
            partner = r ^ (1 << k)
            # a + b == b + a bit for bit, so both partners hold identical sums
            got = t.sendrecv(self._mid(step, layer, "exchange", k + 1, r, partner), buf,
                             self._mid(step, layer, "exchange", k + 1, partner, r), dt, n,
                             borrow=True)
            t.settle()  # our copy of buf has left before the sum overwrites it
            if got is not None:
                np.add(buf, got, out=buf)
        if r + p2 < p:
            t.send(self._mid(step, layer, "exchange", rounds + 1, r, r + p2), buf, True)


class TreeAllreducer(Allreducer):
    """Binomial-tree reduce to rank 0, then binomial broadcast from rank 0."""

    name = "tree"

    def _run(self, buf, step, layer):
        t, p, r = self.transport, self.size, self.rank
        n, dt = buf.size, buf.dtype
        mask, known = 1, None  # known: buf's checksum, from the transport (see RingAllreducer)
        while mask < p:
            k = mask.bit_length() - 1
            if r & mask:
                t.send(self._mid(step, layer, "reduce", k, r, r - mask), buf, True, known)
                break
            if r + mask < p:  # buf += the child's partial sum
                t.recv(self._mid(step, layer, "reduce", k, r + mask, r), dt, n, add_to=buf)
                known = t.last_sum
            mask <<= 1
        if r == 0:
            mask = 1 << (p - 1).bit_length()
        else:
            mask = r & -r
            t.settle()  # the reduce message left buf before the broadcast overwrites it
            if t.recv(self._mid(step, layer, "broadcast", mask.bit_length() - 1, r - mask, r),
                      dt, n, buf) is None:
                buf[:] = 0
            known = t.last_sum
        mask >>= 1
        while mask:
            if r + mask < p:
                t.send(self._mid(step, layer, "broadcast", mask.bit_length() - 1, r, r + mask),
                       buf, True, known)
            mask >>= 1


_CLASSES = {cls.name: cls for cls in (NativeAllreducer, RingAllreducer,
                                      RecursiveDoublingAllreducer, TreeAllreducer)}
# the registry (schema.ALGORITHM_PHASES) names exactly what is implemented here
assert tuple(_CLASSES) == ALGORITHMS, (tuple(_CLASSES), ALGORITHMS)


def make_allreducer(algorithm: str, comm, transport: Transport | None, *, ledger=None,
                    deadline_s: float = 10.0, oversubscribed: bool = False) -> Allreducer:
    """The allreducer for ``algorithm`` (one of :data:`ALGORITHMS`).

    ``comm`` is the harness's duplicated communicator; ``transport`` must be a
    Transport on that communicator for every algorithm but "native" (for native
    it is optional and only provides the crash/slow hooks and wait accounting).
    ``ledger`` defaults to ``transport.ledger``.  ``deadline_s`` bounds the native wait;
    ``oversubscribed`` (more ranks than cores on the node) shortens its spin.
    """
    if algorithm not in _CLASSES:
        raise ValueError(f"unknown allreduce algorithm {algorithm!r}; use one of {ALGORITHMS}")
    if algorithm != "native" and transport is None:
        raise ValueError(f"the {algorithm} allreduce needs a Transport")
    return _CLASSES[algorithm](comm, transport, ledger, deadline_s, oversubscribed)
