"""Closing a connection leaves no message unreceived (mpitrain.comm.closing), on the fake
communicator of tests/fake_comm.py, which keeps every message never received.

Across hosts (MPICH over UCX), each such message printed "unexpected tag-receive descriptor
... was not matched" at MPI_Finalize, and they are erroneous MPI anywhere: the arrival
notices of the guarded collectives, fault notices, acknowledgements, loss announcements,
spare copies of duplicated and retransmitted messages.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from fake_comm import Fabric, run_ranks

from mpitrain.comm.agreement import Agreement
from mpitrain.comm.allreduce import make_allreducer
from mpitrain.comm.closing import close
from mpitrain.comm.faults import FaultInjector, FaultPlan
from mpitrain.comm.outbox import Outbox
from mpitrain.comm.transport import Transport

FAST = dict(deadline_s=2.0, grace_s=0.2, oversubscribed=True)  # threads share the GIL


def ranks_or_raise(size: int, fn, fabric: Fabric) -> list:
    results = run_ranks(size, fn, fabric=fabric)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@pytest.mark.parametrize("delivery, rules", [
    ("strict", []),
    ("strict", [{"kind": "duplicate", "step": 2}]),              # spare copies
    ("strict", [{"kind": "delay", "step": 1, "delay_ms": 30}]),  # a fault notice
    ("reliable", []),                                           # acknowledgements
    ("reliable", [{"kind": "drop", "step": 1, "src": 1, "count": 1},
                  {"kind": "corrupt", "step": 2, "src": 2, "count": 1}]),  # resent copies
    ("lossy", [{"kind": "drop", "step": 1, "src": 1, "count": 2}]),     # loss announcements
])
@pytest.mark.parametrize("size", [2, 3])
def test_a_closed_transport_leaves_no_message_behind(delivery, rules, size):
    fabric, n = Fabric(size), 3000

    def rank_main(comm):
        rank = comm.Get_rank()
        injector = FaultInjector(FaultPlan(list(rules)), rank, None) if rules else None
        t = Transport(comm, delivery=delivery, injector=injector, **FAST)
        ring = make_allreducer("ring", comm, t)
        for step in (1, 2, 3):
            ring.wait(ring.start(np.full(n, rank + step, np.float32), step, 0))
        t.fence(3)
        t.close()
        return t.stats

    stats = ranks_or_raise(size, rank_main, fabric)
    assert fabric.leftovers() == []
    if delivery == "reliable" and rules:
        assert sum(s["retransmissions"] for s in stats) >= 2  # the case has copies to take


@pytest.mark.parametrize("size", [2, 4])
def test_closing_takes_the_notices_nobody_waited_for(size):
    """The guarded collectives' arrival notices (never received once the last collective
    completed), taken by close, which counts them."""
    fabric = Fabric(size)

    def rank_main(comm):
        outbox = Outbox(comm)
        agreement = Agreement(comm, deadline_s=2.0, grace_s=0.2, retransmits=False,
                              post=outbox.post_control)
        for key in range(3):  # each drains the peers' earlier notices: the last round stays
            agreement.arrive(key)
        return close(comm, 2.0, 1e-5, outbox)

    taken = ranks_or_raise(size, rank_main, fabric)
    assert fabric.leftovers() == []
    assert sum(taken) >= size * (size - 1)  # at least the last round of notices


def test_a_peer_that_never_closes_is_given_up_on_after_the_deadline():
    fabric = Fabric(2)
    t0 = time.monotonic()
    assert close(fabric.comm(0), 0.1, 1e-5) == 0
    assert 0.1 <= time.monotonic() - t0 < 2.0
    assert [e.src for e in fabric.leftovers()] == [0]  # its bye, never taken
