"""Split payloads in segments: checked, and reduced, while they are still in cache.

A payload above :data:`~mpitrain.comm.wire.INLINE_MAX` follows its header as
``ceil(nbytes / SEGMENT_BYTES)`` MPI messages of :data:`SEGMENT_BYTES` (the last one
shorter) on the same (source, tag, communicator); MPI's non-overtaking rule keeps them in
order behind their header.  Segments are a matter of the wire only: a packet, its
checksum (one per message, in the header) and every fault stay those of the whole
logical message.

The receiver takes the segments one at a time and feeds each to the message's running
checksum (:class:`~mpitrain.comm.wire.Running`) right after MPI copied it in, while it is
in cache.  Checking a whole multi-MiB payload after its copy reads it back from memory
(on the development box, whose 8 MiB L3 is shared by both ranks, that pass cost as much
as the copy itself).  A reducing receive (``add_to``) lands each segment in one small,
reused buffer and adds it into its destination at once, and checksums the sums as they
are written, so a ring can forward the reduced chunk with that checksum instead of
reading it again (see :mod:`mpitrain.comm.allreduce`).  Such a receive adds before the
message's checksum is known to match: only for a delivery whose corrupted message ends
the collective (strict; lossy has no checksums), never for one that waits for a resend.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm.tags import TAG_DATA
from mpitrain.comm.waiting import Waiter, spin_budget
from mpitrain.comm.wire import MessageId, Running

if TYPE_CHECKING:
    from mpitrain.comm.transport import Transport

# Measured at P = 2 on the development box (docs/performance.md §4): 256 KiB-1 MiB
# segments keep a segment and its share of the destination in L2/L3; smaller ones cost
# more Python per byte (~5 us a segment), larger ones fall out of cache.
SEGMENT_BYTES = 1 << 19


def post_segments(comm, body: np.ndarray, dst: int) -> list[tuple[Any, np.ndarray]]:
    """Isend the uint8 payload ``body`` to ``dst`` as its segments, in order: the
    (request, segment) pairs, whose segments MPI reads until the request completes."""
    return [(comm.Isend(part, dst, TAG_DATA), part)
            for part in (body[a:a + SEGMENT_BYTES] for a in range(0, body.size, SEGMENT_BYTES))]


class Payloads:
    """The receiving side of split payloads, for one transport ``t``.

    ``kind``: the name of the running checksum (:func:`~mpitrain.comm.wire.running_kind`),
    None when payloads are not checked.  Not thread-safe, like the transport.
    """

    def __init__(self, t: Transport, kind: str | None):
        self.t = t
        self.kind = kind
        self._scratch = np.empty(0, np.uint8)  # payloads received without a destination

    def scratch(self, nbytes: int) -> np.ndarray:
        """A reused uint8 buffer of ``nbytes``, valid until the next receive."""
        if self._scratch.size < nbytes:
            self._scratch = np.empty(max(nbytes, 2 * self._scratch.size), np.uint8)
        return self._scratch[:nbytes]

    def receive(self, mid: MessageId, nbytes: int, into: np.ndarray | None,
                add_to: np.ndarray | None = None) -> tuple[np.ndarray, int, int | None]:
        """Receive the ``nbytes`` payload that follows a header from ``mid.src``.

        Into ``into`` (uint8, or a scratch buffer when None), or, with ``add_to`` (an
        array of ``nbytes`` bytes), added into ``add_to`` segment by segment.  Returns
        (the payload: ``into``, the scratch buffer or ``add_to``; the running checksum of
        the bytes received; the checksum of ``add_to`` after the adds, None without
        ``add_to``); checksums are 0 (None) when payloads are not checked.
        """
        got = Running(self.kind) if self.kind is not None else None
        if add_to is not None:
            return self._reduce(mid, nbytes, add_to, got)
        body = into if into is not None else self.scratch(nbytes)
        for a in range(0, nbytes, SEGMENT_BYTES):
            part = body[a:a + SEGMENT_BYTES]
            self._take(mid, part)
            if got is not None:
                got.update(part)
        return body, got.value() if got is not None else 0, None

    def _reduce(self, mid: MessageId, nbytes: int, add_to: np.ndarray,
                got: Running | None) -> tuple[np.ndarray, int, int | None]:
        landing = self.scratch(min(nbytes, SEGMENT_BYTES))
        vals = landing.view(add_to.dtype)
        item = add_to.itemsize
        summed = Running(self.kind) if self.kind is not None else None
        # A corrupted segment may overflow; it then fails the message's check, which ends
        # the collective, so NumPy is not to warn about it.
        with np.errstate(over="ignore", invalid="ignore") if got is not None else nullcontext():
            for a in range(0, nbytes, SEGMENT_BYTES):
                part = landing[:min(SEGMENT_BYTES, nbytes - a)]
                self._take(mid, part)
                dest = add_to[a // item:(a + part.size) // item]
                if got is not None and summed is not None:
                    got.update(part)
                    np.add(dest, vals[:dest.size], out=dest)  # the additions of one np.add
                    summed.update(dest)
                else:
                    np.add(dest, vals[:dest.size], out=dest)
        if got is None or summed is None:
            return add_to, 0, None
        return add_to, got.value(), summed.value()

    def _take(self, mid: MessageId, part: np.ndarray) -> None:
        """Receive the next segment from ``mid.src`` into ``part``, deadline-guarded."""
        t = self.t
        req = t.comm.Irecv([part, part.size, MPI.BYTE], mid.src, TAG_DATA)
        if not req.Test():
            wait = Waiter(t.deadline_s, spin_budget(part.size, t.oversubscribed))
            if not wait.wait_for(req, t._background):  # the sender died mid-message
                t.agreement.report_wait(mid, mid.src, wait.waited())
