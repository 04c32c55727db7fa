"""Error agreement: every rank raises the same :class:`SyncError` (strict and reliable delivery).

The rank that detects a failure (deadline passed, checksum mismatch, protocol mismatch)
sends a report on :data:`~mpitrain.comm.tags.TAG_ERROR` to every other rank.  A rank
blocked in the transport when a report arrives adds its own report (what it waits on, for
how long: :attr:`Agreement.waiting`).  Every rank then collects reports for ``grace_s``
and raises the best one, by the same rule everywhere (:func:`agreed`): a corrupted message
a rank detected beats a wait; a wait on the very message that carried an injected fault (the
sender posts a notice on :data:`~mpitrain.comm.tags.TAG_NOTICE` for every fault it injects),
or on a crashed rank, beats a fault only inferred between the two ranks (a wait in a later
collective), which beats a plain timeout; then a wait on a rank that sent no
report itself (dead, or the culprit) beats a wait on a rank that is itself stuck; then the
longest wait; then the lowest reporter.  So every rank raises the same SyncError with
``reporter`` = the detecting rank, within ``deadline_s + grace_s`` of the fault.  A rank
that is not inside a transport call sees the report at its next one (every collective start
checks); :meth:`mpitrain.comm.transport.Transport.fence` is a deadline-guarded barrier to
call before any native collective that follows own-algorithm traffic, so no rank blocks in
MPI while the others are failing; those native collectives have a deadline too
(:mod:`~mpitrain.comm.guarded`: arrival notices, :meth:`Agreement.report_absent`), for a rank
that dies or sticks after the fence.

Every function here that reports a failure ends by raising: they are typed ``NoReturn``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NoReturn

from mpi4py import MPI

from mpitrain.comm.faults import describe
from mpitrain.comm.tags import TAG_ERROR, TAG_NOTICE
from mpitrain.comm.waiting import Waiter
from mpitrain.comm.wire import MessageId
from mpitrain.errors import SyncError


def grace_for(deadline_s: float) -> float:
    """How long ranks collect error reports by default: a tenth of the deadline, 0.25-1 s."""
    return min(1.0, max(0.25, deadline_s / 10))


FAULT_HINT = ("the fault plan caused this; use delivery = \"reliable\" to survive message "
              "faults, or change the plan")


def agreed(reports: dict[int, dict]) -> dict:
    """The report every rank raises, from all reports heard (reporter -> report): by
    priority, then a wait on a rank that reported nothing itself (dead, or the culprit),
    then the longest wait, then the lowest reporter.  Independent of the order heard."""
    def rank_key(rep: dict) -> tuple:
        peer = rep["waited_on"]
        terminal = peer is not None and peer not in reports
        return (rep["priority"], terminal, rep["waited"], -rep["reporter"])

    return max(reports.values(), key=rank_key)


class Agreement:
    """The error channel of one transport, and the fault notices it names faults with.

    ``post(dst, tag, obj)`` sends a pickled control message that is never waited on.
    ``retransmits``: the delivery mode resends lost messages (its wait reports say
    "despite retransmission").  ``ledger`` is flushed with the error before it is raised.
    """

    def __init__(self, comm, *, deadline_s: float, grace_s: float, retransmits: bool,
                 post: Callable[[int, int, Any], None], ledger=None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.deadline_s = deadline_s
        self.grace_s = grace_s
        self.retransmits = retransmits
        self.post = post
        self.ledger = ledger
        # (MessageId or None, peer, monotonic start) while the transport is blocked
        self.waiting: tuple[MessageId | None, int, float] | None = None
        # (check, step, key, monotonic start) while in a guarded native collective
        self.checking: tuple[str, int | None, int, float] | None = None
        self._arrived: dict[int, int] = {}  # peer -> the last guarded collective it entered
        self._notices: dict[tuple, dict] = {}
        self._crash_notices: dict[int, dict] = {}
        self._last_from: dict[int, tuple[tuple, dict]] = {}  # peer -> its newest notice to us
        self._last_to: dict[int, tuple[tuple, dict]] = {}    # peer -> our newest fault to it

    def note_own(self, mid: MessageId, event: dict) -> None:
        """This rank injected fault ``event`` into message ``mid`` (to ``mid.dst``): if the
        peer then stops taking delivery, the error can name it."""
        self._last_to[mid.dst] = (tuple(mid), event)

    # ---------------------------------------------------------------- notices
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
            if "arrived" in note:
                self._arrived[st.Get_source()] = note["arrived"]
            elif "crash" in note:
                self._crash_notices[note["crash"]] = note["fault"]
            else:
                self._notices[tuple(note["mid"])] = note["fault"]
                self._last_from[st.Get_source()] = (tuple(note["mid"]), note["fault"])

    # ------------------------------------------------------------------ reports
    def check(self) -> None:
        """If another rank reported a failure, join in: raise the agreed error."""
        if self.comm.Iprobe(MPI.ANY_SOURCE, TAG_ERROR):
            self._join()

    def _join(self) -> NoReturn:
        """Add what this rank is blocked on (if anything) to the reports, then resolve."""
        if self.checking is not None:
            check, step, key, t0 = self.checking
            self.report_absent(check, step, key, time.monotonic() - t0)
        if self.waiting is None:
            self.resolve(None)
        mid, peer, t0 = self.waiting
        self.report_wait(mid, peer, time.monotonic() - t0)

    def report_wait(self, mid: MessageId | None, peer: int, waited: float) -> NoReturn:
        """Report that this rank has waited ``waited`` s for ``peer``: for message ``mid``,
        or (``mid`` None) for ``peer`` to take delivery of or acknowledge its messages."""
        self.waiting = None
        what = self._wait_text(mid, peer, waited)
        exact, fault = self._injected(mid, peer)
        step = mid.step if mid is not None else None
        layer = mid.layer if mid is not None and mid.algorithm != "fence" else None
        if fault:  # a fault on the very message (or the peer's crash) beats one inferred
            self.fail(3 if exact else 2, f"{what}. Injected fault: {fault}.", FAULT_HINT,
                      waited_on=peer, waited=waited, step=step, layer=layer)
        self.fail(1, f"{what}.", f"rank {peer} may have died (crashed or killed) or be stuck; "
                  "look at its output and run `mpitrain diagnose` on the run folder",
                  waited_on=peer, waited=waited, step=step, layer=layer)

    def arrive(self, key: int) -> None:
        """This rank enters guarded native collective number ``key`` (counted alike on every
        rank, see :mod:`~mpitrain.comm.guarded`): tell every peer, never waiting."""
        self._drain_notices()  # the peers' arrivals so far: they must not pile up
        for r in range(self.size):
            if r != self.rank:
                self.post(r, TAG_NOTICE, {"arrived": key})

    def report_absent(self, check: str, step: int | None, key: int, waited: float) -> NoReturn:
        """Report that guarded collective ``key`` (``check`` of ``step``; None: outside
        training) did not complete in ``waited`` s: name the ranks that never arrived there,
        and an injected crash of one.

        A rank that every peer arrived for reports with the lowest priority: it is the late
        one (the others' reports name it) or a peer died inside the collective."""
        self.checking = None
        self._drain_notices()
        missing = [r for r in range(self.size)
                   if r != self.rank and self._arrived.get(r, -1) < key]
        where = check if step is None else f"step {step}, {check}" if step else \
            f"before step 1, {check}"
        deadline = f"deadline {self.deadline_s:g} s"
        if not missing:
            self.fail(0, f"{where}: every rank arrived, but the collective did not complete in "
                      f"{waited:.3g} s ({deadline})", "a rank may have died inside the "
                      "collective; look at the ranks' output", waited=waited, step=step)
        names = ("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing))
        what = (f"{where}: {names} did not arrive within the deadline (rank {self.rank} "
                f"waited {waited:.3g} s, {deadline})")
        crashed = [describe(self._crash_notices[r]) for r in missing if r in self._crash_notices]
        if crashed:
            self.fail(3, f"{what}. Injected fault: {'; '.join(crashed)}.", FAULT_HINT,
                      waited_on=missing[0], waited=waited, step=step)
        self.fail(1, f"{what}.", f"{names} may have died (crashed or killed) or be stuck after "
                  "the previous collective; look at its output and run `mpitrain diagnose` on "
                  "the run folder", waited_on=missing[0], waited=waited, step=step)

    def _injected(self, mid: MessageId | None, peer: int) -> tuple[bool, str | None]:
        """(exact, the injected fault that explains a wait on ``peer`` for message ``mid``),
        if one is known: exactly, a fault on that very message or the peer's crash; else,
        inferred, the newest fault on a message between the two ranks, with where it
        struck.  (False, None) when none is known."""
        self._drain_notices()
        if mid is not None and tuple(mid) in self._notices:
            return True, describe(self._notices[tuple(mid)])
        if peer in self._crash_notices:
            return True, describe(self._crash_notices[peer])
        heard = [n for n in (self._last_from.get(peer), self._last_to.get(peer)) if n]
        if not heard:
            return False, None
        where, note = max(heard, key=lambda n: n[1].get("t", 0.0))
        return False, f"{describe(note)} on {MessageId(*where).where()}"

    def _wait_text(self, mid: MessageId | None, peer: int, waited: float) -> str:
        deadline = f"deadline {self.deadline_s:g} s"
        if mid is not None and mid.algorithm == "fence":  # the step-end liveness check
            return (f"after step {mid.step}: rank {self.rank} heard nothing from rank {peer} "
                    f"at the step-end check in {waited:.3g} s ({deadline})"
                    + (" despite retransmission" if self.retransmits else ""))
        if mid is None and not self.retransmits:
            return (f"rank {self.rank}: rank {peer} took no delivery of a message in "
                    f"{waited:.3g} s ({deadline})")
        if mid is None:
            return (f"rank {self.rank}: rank {peer} acknowledged nothing in {waited:.3g} s "
                    f"({deadline}) despite retransmission")
        what = (f"step {mid.step}, layer {mid.layer}: rank {self.rank} received nothing from "
                f"rank {peer} in {waited:.3g} s ({deadline}; "
                f"{mid.algorithm} {mid.phase}, chunk {mid.chunk})")
        return what + " despite retransmission" if self.retransmits else what

    def fail_corrupt(self, mid: MessageId) -> NoReturn:
        """Message ``mid`` arrived with a payload that does not match its checksum."""
        self._drain_notices()
        note = self._notices.get(tuple(mid))
        msg = (f"step {mid.step}, layer {mid.layer}: rank {self.rank} received a corrupted message "
               f"from rank {mid.src} ({mid.algorithm} {mid.phase}, chunk {mid.chunk}): "
               f"checksum mismatch.")
        if note:
            msg += f" Injected fault: {describe(note)}."
        # seen, not waited for: a detected corruption outranks every wait
        self.fail(4 if note else 2, msg, "use delivery = \"reliable\" to retransmit corrupted messages",
                  step=mid.step, layer=mid.layer)

    def fail_mismatch(self, problem: str, mid: MessageId, hdr: tuple) -> NoReturn:
        """The packet in sequence is not ``mid``'s (``problem`` "message"), or its checksum
        kind differs ("checksum"; see :func:`mpitrain.comm.wire.header_problem`)."""
        src = mid.src
        if problem == "checksum":
            self.fail(2, f"rank {self.rank} and rank {src} use different message checksums "
                      f"({mid.where()})", "set the same [faults] checksum and install the "
                      "same mpitrain dependencies (crc32c) on every rank")
        self.fail(2, f"rank {self.rank} received a message from rank {src} that is not "
                  f"the one expected ({mid.where()}): header {list(hdr[:11])}",
                  "the ranks do not run the same sequence of collectives "
                  "(different layer sizes, order or algorithm)")

    def fail(self, priority: int, message: str, hint: str | None,
             waited_on: int | None = None, waited: float = 0.0, step: int | None = None,
             layer: int | None = None) -> NoReturn:
        """Report a failure detected on this rank to all ranks, then raise the agreed error."""
        self.waiting = None
        report = {"reporter": self.rank, "priority": priority, "waited_on": waited_on,
                  "waited": waited, "message": message, "hint": hint, "step": step,
                  "layer": layer}
        for r in range(self.size):
            if r != self.rank:
                self.post(r, TAG_ERROR, report)
        self.resolve(report)

    def resolve(self, own: dict | None) -> NoReturn:
        """Collect error reports for ``grace_s``, pick the same one as every rank, raise it."""
        reports = {own["reporter"]: own} if own else {}
        st = MPI.Status()
        grace = Waiter(self.grace_s, spin_s=0.0)  # nothing to copy: sleep from the start
        while True:
            while self.comm.Iprobe(MPI.ANY_SOURCE, TAG_ERROR, st):
                rep = self.comm.recv(source=st.Get_source(), tag=TAG_ERROR)
                reports[rep["reporter"]] = rep
            if grace.expired():
                break
            grace.pause()
        best = agreed(reports)
        if self.ledger is not None:
            self.ledger.flush(error=best["message"])
        raise SyncError(best["message"], hint=best["hint"], reporter=best["reporter"],
                        step=best.get("step"), layer=best.get("layer"),
                        ranks=[best["waited_on"]] if best["waited_on"] is not None else [])
