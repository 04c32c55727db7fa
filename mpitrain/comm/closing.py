"""Closing a connection: no message is left unreceived when a communicator is freed.

Some messages are never waited for: the arrival notices of the guarded collectives, fault
notices, loss announcements, acknowledgements, and spare copies of duplicated or
retransmitted messages.  The last of them are still addressed to a peer when it is done
with the connection.  MPI calls a message that is never received erroneous, and over UCX
(multi-host MPICH) every one of them prints "unexpected tag-receive descriptor ... was not
matched" at MPI_Finalize.  So every communicator the harness duplicated is closed by
:func:`close`:

1. each rank sends an empty :data:`~mpitrain.comm.tags.TAG_BYE` to every peer, after every
   other message it sent on the communicator;
2. each rank receives everything addressed to it, with any tag, until it has the bye of
   every peer.  A receive with ``ANY_TAG`` matches every message, so MPI's non-overtaking
   rule (one sender, one communicator, a receive matching both: the first sent is taken
   first) means that by a peer's bye, all it sent before is taken too;
3. this rank's sends still on their way (the peers are taking them) are waited for, at
   most ``deadline_s``, through the transport's :class:`~mpitrain.comm.outbox.Outbox`,
   and the communicator is freed.

Collective: every rank of the communicator calls it, once nothing else is sent on it.  It
also works as a barrier: a rank returns once every peer has started closing.  A peer that
never says bye (dead, or stuck) is given up on after ``deadline_s``; what it sent stays.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm.outbox import Outbox, keep_alive
from mpitrain.comm.tags import TAG_BYE
from mpitrain.comm.waiting import CHECK_MASK, Waiter

_NOTHING = np.empty(0, np.uint8)


def close(comm: Any, deadline_s: float, spin_s: float, outbox: Outbox | None = None) -> int:
    """Collective: take every message still addressed to this rank on ``comm`` (discarded:
    nobody needs them any more), wait for the sends of ``outbox`` (if given), free
    ``comm``.  Returns how many messages were taken besides the byes; the peers not heard
    from within ``deadline_s`` are given up on."""
    rank, size = comm.Get_rank(), comm.Get_size()
    byes = [comm.Isend(_NOTHING, peer, TAG_BYE) for peer in range(size) if peer != rank]
    waiting, taken = size - 1, 0
    status, wait, polls = MPI.Status(), Waiter(deadline_s, spin_s), 0
    while waiting:
        message = comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
        if message is not None:
            message.Recv([np.empty(status.Get_count(MPI.BYTE), np.uint8), MPI.BYTE])
            if status.Get_tag() == TAG_BYE:
                waiting -= 1
            else:
                taken += 1
            continue
        polls += 1
        if polls & CHECK_MASK == 0:
            if wait.expired():
                break
            wait.pause()
    keep_alive([(request, _NOTHING) for request in byes if not request.Test()])
    if outbox is not None:
        outbox.flush(deadline_s, spin_s)
    comm.Free()
    return taken
