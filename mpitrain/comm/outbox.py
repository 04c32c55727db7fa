"""Sends in flight: every send's buffer stays alive until MPI has read it.

MPI reads a send buffer until its request completes; a message released late (a delayed or
reordered one) may still be in flight when a collective returns, and freeing its buffer
then (the transport going away, the process finalizing) would send garbage or nothing.  So
every non-blocking send of a transport is recorded here with its buffer, and
:meth:`Outbox.flush` waits for them when the transport closes.  Sends still pending after
that deadline (their receiver is gone) are kept for the process's lifetime, in a bounded
list (:func:`keep_alive`).  Control messages (pickled, small) are recorded but never
waited for: the peer may be dead.  Nor are spare copies (:attr:`Outbox.spare`: the second
copy of a duplicated message), which the peer never needs: once it took the first, only its
closing (:mod:`~mpitrain.comm.closing`) takes the spare, and a large one must not hold its
sender at close until then.
"""
from __future__ import annotations

from typing import Any

from mpitrain.comm.waiting import Waiter

_KEEP_ALIVE: list[tuple[Any, Any]] = []  # (request, buffer) of sends that outlived flush()
KEEP_ALIVE_MAX = 1024
PRUNE_AT = 32  # prune completed sends once this many are recorded (see prune)


def keep_alive(pending: list[tuple[Any, Any]]) -> None:
    """Keep the buffers of sends still pending after a flush alive: MPI may still read them.

    Bounded: completed sends are let go at every call, and past :data:`KEEP_ALIVE_MAX` the
    oldest go too -- each stayed pending through at least one flush's deadline and every
    later one, so its receiver is gone.
    """
    alive = [(q, b) for q, b in _KEEP_ALIVE if not q.Test()]
    alive.extend(pending)
    _KEEP_ALIVE[:] = alive[-KEEP_ALIVE_MAX:]


class Outbox:
    """The non-blocking sends of one transport on ``comm``, with the buffers they read.

    :attr:`pending` is a list of ``(request, buffer)`` (buffer None: a control message);
    the transport appends its data sends to it directly (one list append per send), and
    the sends of spare copies to :attr:`spare` (kept alive, never waited for).
    """

    def __init__(self, comm):
        self.comm = comm
        self.pending: list[tuple[Any, Any]] = []
        self.spare: list[tuple[Any, Any]] = []

    def post_control(self, dst: int, tag: int, obj: Any) -> None:
        """Small pickled control message; never waited on (the peer may be dead)."""
        self.pending.append((self.comm.isend(obj, dst, tag), None))

    def isend(self, buf, dst: int, tag: int) -> None:
        """Send ``buf``, kept alive until sent (and waited for by :meth:`flush`)."""
        self.pending.append((self.comm.Isend(buf, dst, tag), buf))

    def sent(self) -> bool:
        """Whether every send so far (control messages too) has left this rank."""
        return all(q.Test() for q, _ in self.pending)

    def prune(self) -> None:
        """Let completed sends go, once more than :data:`PRUNE_AT` are recorded (cheap to
        call after every collective)."""
        for sends in (self.pending, self.spare):
            if len(sends) > PRUNE_AT:
                sends[:] = [(q, b) for q, b in sends if not q.Test()]

    def flush(self, deadline_s: float, spin_s: float) -> None:
        """Wait until every data send has left its buffer, at most ``deadline_s``; hand the
        ones still pending then, and the spare copies not sent yet, to :func:`keep_alive`."""
        keep_alive([(q, b) for q, b in self.spare if not q.Test()])
        self.spare.clear()
        wait = Waiter(deadline_s, spin_s)
        while True:
            self.pending[:] = [(q, b) for q, b in self.pending if not q.Test()]
            if all(b is None for _, b in self.pending):  # control messages: never waited on
                return
            if wait.expired():
                keep_alive(self.pending)
                return
            wait.pause()
