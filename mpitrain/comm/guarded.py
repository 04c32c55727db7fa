"""Native collectives with a deadline: how the replica and end-to-end checks talk.

The checks (:mod:`~mpitrain.comm.checks`) and the step-end duties compare small tables
across ranks with native MPI collectives, after the transport's fence.  A blocking
collective never returns when a peer died or got stuck after the fence, and under a plain
``mpiexec`` nothing would ever end the survivors' wait.  So every collective here is
non-blocking (``Iallgather``, ``Iallgatherv``, ``Iallreduce``, ``Igatherv``, ``Ibcast``,
``Ibarrier``) and waited on by the one
wait rule (:meth:`~mpitrain.comm.waiting.Waiter.wait_for`), which watches the deadline
and the error channel:

* before starting a collective, a rank tells every peer that it arrived there
  (:meth:`Agreement.arrive`: a notice, never waited on);
* at the deadline it reports on the error channel the ranks it heard no arrival from
  (:meth:`Agreement.report_absent`); every rank still alive joins in, and all raise the
  same :class:`~mpitrain.errors.SyncError` (exit status 3): "step S, the replica check:
  rank R did not arrive within the deadline", naming an injected crash when one is known.

Every rank must call the same collectives in the same order, as with MPI itself.  Two
guards may share a communicator's collectives, never its error channel: a guard with an
agreement of its own (``agreement=None``) must be the only one on its communicator (a
rank's :attr:`~mpitrain.context.RankContext.guard` is that one for ``ctx.comm``; the
synchronizer's guard borrows the transport's channel, on the transport's own duplicate).
:func:`duplicate` is the same rule for a communicator's duplication (each transport's own).
"""
from __future__ import annotations

import pickle
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from mpitrain.comm.agreement import Agreement, grace_for
from mpitrain.comm.outbox import Outbox, keep_alive
from mpitrain.comm.waiting import Waiter, spin_budget
from mpitrain.errors import SyncError


class GuardedComm:
    """Deadline-guarded native collectives on ``comm``, attributed through ``agreement``.

    ``agreement``: the transport's error channel when the job has a transport (so a crash
    notice names the fault); None makes a channel of its own on ``comm``, which must then
    carry no other transport.  ``deadline_s``: how long a collective may wait for its peers.
    """

    def __init__(self, comm: Any, agreement: Agreement | None, deadline_s: float,
                 oversubscribed: bool = False):
        self.comm = comm
        self.size = comm.Get_size()
        self.deadline_s = deadline_s
        self.oversubscribed = oversubscribed
        if agreement is None:
            self._outbox: Outbox | None = Outbox(comm)
            agreement = Agreement(comm, deadline_s=deadline_s, grace_s=grace_for(deadline_s),
                                  retransmits=False, post=self._outbox.post_control)
        else:
            self._outbox = None  # the transport's outbox holds the notices
        self.agreement = agreement
        self._count = 0  # guarded collectives so far: the same number on every rank

    def allgather(self, obj: Any, check: str, step: int | None) -> list:
        """Collective: every rank's ``obj`` (picklable), in rank order.  ``check`` and
        ``step`` name the collective in the error if a rank does not arrive (``step`` None:
        outside training, e.g. ``mpitrain evaluate``)."""
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = np.zeros(self.size, np.int64)
        mine = np.array([data.size], np.int64)
        self._collective(lambda: self.comm.Iallgather(mine, sizes), check, step, 0)
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        out = np.empty(int(sizes.sum()), np.uint8)
        self._collective(lambda: self.comm.Iallgatherv(data, [out, (sizes, offsets), MPI.BYTE]),
                         check, step, out.nbytes)
        return [pickle.loads(out[o:o + n].tobytes()) for o, n in zip(offsets, sizes)]

    def sum(self, local: np.ndarray, check: str, step: int | None) -> np.ndarray:
        """Collective: the element-wise SUM over ranks of ``local`` (a new array)."""
        total = np.empty_like(local)
        self._collective(lambda: self.comm.Iallreduce(local, total, MPI.SUM), check, step,
                         local.nbytes)
        return total

    def gather(self, obj: Any, check: str, step: int | None, root: int = 0) -> list | None:
        """Collective: every rank's ``obj`` (picklable) in rank order on ``root``, None
        elsewhere.  The sizes travel to every rank first, so every rank -- not only the root
        -- knows that all arrived, and names one that did not."""
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = np.zeros(self.size, np.int64)
        mine = np.array([data.size], np.int64)
        self._collective(lambda: self.comm.Iallgather(mine, sizes), check, step, 0)
        if self.comm.Get_rank() != root:
            self._collective(lambda: self.comm.Igatherv(data, None, root), check, step,
                             data.nbytes)
            return None
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        out = np.empty(int(sizes.sum()), np.uint8)
        self._collective(lambda: self.comm.Igatherv(data, [out, (sizes, offsets), MPI.BYTE],
                                                    root), check, step, out.nbytes)
        return [pickle.loads(out[o:o + n].tobytes()) for o, n in zip(offsets, sizes)]

    def bcast(self, obj: Any, check: str, step: int | None, root: int = 0) -> Any:
        """Collective: ``root``'s ``obj`` (picklable; ignored elsewhere) on every rank."""
        is_root = self.comm.Get_rank() == root
        data = np.frombuffer(bytearray(pickle.dumps(obj)), np.uint8) if is_root else None
        size = np.array([data.size if data is not None else 0], np.int64)
        self._collective(lambda: self.comm.Ibcast(size, root), check, step, 0)
        buf = data if data is not None else np.empty(int(size[0]), np.uint8)
        self._collective(lambda: self.comm.Ibcast(buf, root), check, step, buf.nbytes)
        return obj if is_root else pickle.loads(buf.tobytes())

    def barrier(self, check: str, step: int | None) -> None:
        """Collective: return once every rank has arrived here."""
        self._collective(self.comm.Ibarrier, check, step, 0)

    def _collective(self, start: Callable[[], Any], check: str, step: int | None,
                    nbytes: int) -> None:
        """Announce the arrival, start the collective, wait for it (see the module)."""
        key = self._count
        self._count += 1
        agreement = self.agreement
        agreement.arrive(key)
        request = start()
        wait = Waiter(self.deadline_s, spin_budget(nbytes, self.oversubscribed))
        agreement.checking = (check, step, key, wait.t0)
        try:
            if not wait.wait_for(request, agreement.check):
                agreement.report_absent(check, step, key, wait.waited())
        except BaseException:
            keep_alive([(request, start)])  # its closure holds the buffers MPI may still fill
            raise
        finally:
            agreement.checking = None
        if self._outbox is not None:
            self._outbox.prune()


def duplicate(comm: Any, deadline_s: float) -> Any:
    """Collective: a new duplicate of ``comm`` (``Idup``), or SyncError after ``deadline_s``."""
    dup, request = comm.Idup()
    if not Waiter(deadline_s).wait_for(request):
        raise SyncError(f"rank {comm.Get_rank()}: not every rank opened a connection within the "
                        f"deadline ({deadline_s:g} s): a rank stopped taking part",
                        hint="look at the other ranks' output; a rank may have died or hung")
    return dup
