"""Waiting: the one deadline-and-backoff rule of every poll loop in the harness.

The harness never blocks inside MPI: a peer that died would leave it there forever.  Every
wait polls instead (``Improbe``, ``Test``), with a deadline, through a :class:`Waiter`:

Spin, then sleep
    A wait polls without sleeping for its spin budget (:func:`spin_budget`):
    :data:`SPIN_S`, plus :data:`SPIN_S_PER_BYTE` for each byte of a payload being copied
    (about the time the copy takes at 1 GB/s; MPICH copies only inside our own MPI calls,
    so sleeping in the copy stalls it), or only :data:`SPIN_S_SHARED` on an
    oversubscribed node, where the peer we wait for may need our core.  Past the budget it
    sleeps :data:`SLEEP_FRACTION` of the time waited so far, at most :data:`SLEEP_MAX_S`.
Duties every CHECK_EVERY-th poll
    While polling a request or a channel, a wait does its slower duties (the error channel,
    acknowledgements, retransmission timers, delayed messages, the deadline, the pause)
    only every :data:`CHECK_EVERY`-th poll: they cost about as much as a poll.  The hot
    loops test ``polls & CHECK_MASK`` inline (no Python call per poll);
    :meth:`Waiter.wait_for` is that loop for one request.

mpi4py's own backoff helper (``mpi4py.util.pool``/``futures``) is the model.
"""
from __future__ import annotations

import time
from typing import Any, Callable

SPIN_S = 2e-4           # poll without sleeping this long before the first sleep ...
SPIN_S_PER_BYTE = 1e-9  # ... plus this per byte of a payload in the middle of its copy
SPIN_S_SHARED = 2e-5    # ... or only this on an oversubscribed node (more ranks than cores)
SLEEP_FRACTION = 0.125  # past the spin, sleep this fraction of the time waited so far ...
SLEEP_MAX_S = 1e-3      # ... but at most this long
CHECK_EVERY = 8         # the slower duties of a poll loop run every CHECK_EVERY-th poll
CHECK_MASK = CHECK_EVERY - 1  # ``polls & CHECK_MASK == 0`` on those polls


def spin_budget(nbytes: int = 0, oversubscribed: bool = False) -> float:
    """How long to poll without sleeping while waiting for ``nbytes`` to arrive (or leave).

    Not capped: a payload's copy takes about this long, and sleeping in it stalls it.  The
    waits keep watching the error channel and their deadline while they spin.

    Measured at P = 4 on 2 cores: spinning through copies made the own algorithms 2-3x
    slower than a short spin (the peer we wait for could not run); at P = 2 on 2 cores
    the long spin made a 4 MiB ring 15% faster.
    """
    return SPIN_S_SHARED if oversubscribed else SPIN_S + SPIN_S_PER_BYTE * nbytes


class Waiter:
    """One wait: its start, its deadline, and the pause between two idle polls.

    Create it when the wait starts; call :meth:`pause` between polls that found nothing
    (every :data:`CHECK_EVERY`-th one in the hot loops) and give up once
    :attr:`deadline` (a ``time.monotonic`` value) has passed.
    """

    __slots__ = ("t0", "deadline_s", "deadline", "spin_s")

    def __init__(self, deadline_s: float, spin_s: float = SPIN_S):
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s
        self.deadline = self.t0 + deadline_s
        self.spin_s = spin_s

    def waited(self) -> float:
        """Seconds since the wait started."""
        return time.monotonic() - self.t0

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() > self.deadline

    def restart_at(self, t: float) -> None:
        """Move the deadline to ``deadline_s`` after monotonic time ``t``."""
        self.deadline = t + self.deadline_s

    def pause(self, now: float | None = None) -> bool:
        """Pause between two idle polls (``now``: time.monotonic(), if at hand); True if it slept.

        Spin first: a sleep, however short, costs ~80 us here (a small message's whole
        latency), and a rank asleep stalls a shared-memory copy, which only advances inside
        its own MPI calls (measured: a 4 MiB ring allreduce 0.86x native with a 64-poll spin,
        0.98x spinning through the copy).  Past ``spin_s``, sleep 1/8 of the time waited so
        far, at most 1 ms: at most ~12% added latency, and the core goes to the peer we wait
        for on an oversubscribed node.
        """
        waited = (time.monotonic() if now is None else now) - self.t0
        if waited <= self.spin_s:
            return False
        time.sleep(min(SLEEP_MAX_S, SLEEP_FRACTION * waited))
        return True

    def wait_for(self, request: Any, duties: Callable[[], None] | None = None) -> bool:
        """Poll ``request`` (anything with ``Test()``) until it completes: True, or until the
        deadline passes: False.  ``duties`` (e.g. watching the error channel; it may raise)
        runs with the deadline check every :data:`CHECK_EVERY`-th poll."""
        polls = 0
        while not request.Test():
            polls += 1
            if polls & CHECK_MASK:
                continue
            if duties is not None:
                duties()
            now = time.monotonic()
            if now > self.deadline:
                return False
            self.pause(now)
        return True
