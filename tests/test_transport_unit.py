"""Unit tests of the transport's parts, in one process (tests/fake_comm.py: ranks as threads).

The wire format, the waiting rule, the delivery modes, the fault mechanics and the error
agreement, each on its own; the multi-process tests (test_transport_faults.py,
test_allreduce.py) run the same paths under mpiexec.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from fake_comm import Fabric, run_ranks

from mpitrain.comm import outbox
from mpitrain.comm import segments, waiting, wire
from mpitrain.comm.agreement import agreed
from mpitrain.comm.allreduce import make_allreducer
from mpitrain.comm.faults import FaultInjector, FaultPlan
from mpitrain.comm.tags import TAG_LOSS
from mpitrain.comm.checks import StepEvidence
from mpitrain.comm.transport import Transport
from mpitrain.comm.wire import INLINE_MAX, MessageId
from mpitrain.errors import SyncError

FAST = dict(deadline_s=2.0, grace_s=0.2, oversubscribed=True)  # threads share the GIL


def transport(comm, rules=(), events=None, **kw) -> Transport:
    injector = FaultInjector(FaultPlan(list(rules)), comm.Get_rank(), events) if rules else None
    return Transport(comm, injector=injector, events=events, **{**FAST, **kw})


def mid(step: int, chunk: int = 0, src: int = 0, dst: int = 1, layer: int = 0) -> MessageId:
    return MessageId(step, layer, "p2p", "p2p", chunk, src, dst)


def payload(step: int, n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 1000 * step).astype(np.float32)


def point_to_point(sizes, rules=(), **kw):
    """Rank 0 sends payload(step, n) for each (step, n) in ``sizes``, rank 1 receives them;
    returns (received arrays, rank 0's transport, rank 1's transport)."""
    def rank_main(comm):
        t = transport(comm, rules, **kw)
        if comm.Get_rank() == 0:
            for step, n in sizes:
                t.send(mid(step), payload(step, n))
            t.drain()
            return t
        got = []
        for step, n in sizes:  # a view valid until the next recv: copy it now
            g = t.recv(mid(step), np.float32, n)
            got.append(None if g is None else g.copy())
        return got, t
    r0, r1 = run_ranks(2, rank_main)
    for r in (r0, r1):
        if isinstance(r, BaseException):
            raise r
    return r1[0], r0, r1[1]


# -------------------------------------------------------------------- wire
def test_one_header_check_tells_wrong_message_from_checksum_kind():
    m = mid(3, chunk=2)
    hdr = wire.HEADER.unpack(wire.pack_header(m, 5, 123, 40, wire.checksum_kind(True)[1]))
    ok = wire.checksum_kind(True)[1]
    assert wire.header_problem(hdr, m, 5, 40, None, ok) is None
    assert wire.header_problem(hdr, m, 5, 40, None, wire.checksum_kind(False)[1]) == "checksum"
    for other in (m._replace(step=4), m._replace(chunk=1), m._replace(phase="fence"),
                  m._replace(src=1)):
        assert wire.header_problem(hdr, other, 5, 40, None, ok) == "message"
    assert wire.header_problem(hdr, m, 6, 40, None, ok) == "message"            # sequence
    assert wire.header_problem(hdr, m, 5, 44, None, ok) == "message"            # length
    assert wire.header_problem(hdr, m, 5, 40, np.zeros(8, np.uint8), ok) == "message"


@pytest.mark.parametrize("split", [False, True])
def test_corrupted_copy_changes_one_bit_or_one_element(split):
    data = payload(1, 64).view(np.uint8)
    head = wire.pack_header(mid(1), 0, 0, data.size, wire.F_SPLIT if split else 0)
    pkt = (head, data.copy()) if split else (b"".join((head, data)), None)
    bad_head, bad_body = wire.corrupted(pkt, np.float32, "bitflip", pick=12345)
    got = bad_body if split else np.frombuffer(bad_head, np.uint8)[wire.HDR_BYTES:]
    assert np.unpackbits(got ^ data).sum() == 1
    assert np.array_equal(pkt[1] if split else np.frombuffer(pkt[0], np.uint8)[wire.HDR_BYTES:],
                          data)  # the original is untouched
    _, nan_body = wire.corrupted((head, data.copy()), np.float32, "nan", pick=7)
    vals = nan_body.view(np.float32)
    assert np.isnan(vals[7]) and np.array_equal(np.delete(vals, 7), np.delete(data.view(np.float32), 7))


def test_tombstone_keeps_the_identity_and_drops_the_payload():
    m = mid(2)
    head = wire.pack_header(m, 9, 77, 4 * INLINE_MAX, wire.F_SPLIT)
    words = wire.HEADER.unpack(wire.tombstone(head))
    assert words[wire.H_FLAGS] & wire.F_DROPPED and not words[wire.H_FLAGS] & wire.F_SPLIT
    assert words[:wire.H_FLAGS] == wire.HEADER.unpack(head)[:wire.H_FLAGS]


# ----------------------------------------------------------------- waiting
class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(waiting, "time", c)
    return c


def test_spin_budget_grows_with_the_copy_unless_oversubscribed():
    assert waiting.spin_budget() == waiting.SPIN_S
    assert waiting.spin_budget(4 << 20) == pytest.approx(waiting.SPIN_S + (4 << 20) * 1e-9)
    assert waiting.spin_budget(4 << 20, oversubscribed=True) == waiting.SPIN_S_SHARED


def test_waiter_spins_then_sleeps_an_eighth_of_the_wait_at_most_1ms(clock):
    w = waiting.Waiter(10.0, spin_s=1e-3)
    clock.now += 0.9e-3
    assert not w.pause() and not clock.sleeps          # inside the spin: no sleep
    clock.now += 0.2e-3
    assert w.pause() and clock.sleeps[-1] == pytest.approx(1.1e-3 / 8)
    clock.now += 1.0
    w.pause()
    assert clock.sleeps[-1] == waiting.SLEEP_MAX_S      # capped
    assert not w.expired()
    clock.now = w.t0 + 10.0 + 1e-9
    assert w.expired()


class Countdown:
    """A request that completes on its ``n``-th Test; each Test takes ``tick`` s of ``clock``."""

    def __init__(self, n, clock=None, tick=0.0):
        self.n, self.clock, self.tick = n, clock, tick

    def Test(self):
        if self.clock is not None:
            self.clock.now += self.tick
        self.n -= 1
        return self.n <= 0


def test_wait_for_does_its_duties_every_8th_poll_and_gives_up_at_the_deadline(clock):
    duties = []
    assert waiting.Waiter(1.0).wait_for(Countdown(8 * 5 + 3), lambda: duties.append(1))
    assert len(duties) == 5 and not clock.sleeps       # 43 polls, no time passed: no sleep
    duties.clear()
    w = waiting.Waiter(0.05, spin_s=0.0)
    assert not w.wait_for(Countdown(10**6, clock, tick=1e-6), lambda: duties.append(1))
    assert clock.now > w.deadline and max(clock.sleeps) <= waiting.SLEEP_MAX_S
    assert len(duties) == len(clock.sleeps) + 1         # each pause follows the duties


# ---------------------------------------------------------------- delivery
def test_strict_delivers_inline_and_split_payloads_in_order():
    sizes = [(1, 0), (2, 3), (3, INLINE_MAX // 4), (4, INLINE_MAX // 4 + 1), (5, 40000)]
    got, t0, t1 = point_to_point(sizes)
    for (step, n), g in zip(sizes, got):
        assert np.array_equal(g, payload(step, n)), step
    assert t1.stats["received"] == len(sizes) and t0.stats["sent"] == len(sizes)


@pytest.mark.parametrize("delivery, checksum", [
    ("strict", "xxh3"), ("strict", "crc32c"), ("strict", False), ("reliable", "xxh3"),
    ("lossy", "xxh3")])
def test_a_payload_of_several_segments_is_added_bitwise_and_its_sum_checksummed(
        delivery, checksum):
    n = (5 * segments.SEGMENT_BYTES) // 8 + 3  # float32: two full segments and a part
    base = np.linspace(-1, 1, n, dtype=np.float32)

    def rank_main(comm):
        t = transport(comm, delivery=delivery, checksum=checksum)
        if comm.Get_rank() == 0:
            t.send(mid(1), payload(1, n), borrow=True)
            t.drain()
            return None
        acc = base.copy()
        assert t.recv(mid(1), np.float32, n, add_to=acc) is not None
        return acc, t.last_sum
    _, (acc, last_sum) = run_ranks(2, rank_main)
    assert np.array_equal(acc.view(np.uint32), np.add(base, payload(1, n)).view(np.uint32))
    summer = wire.checksum_kind(checksum)[0]
    fused = checksum and delivery == "strict"  # reliable adds only once verified
    assert last_sum == (summer(acc.view(np.uint8)) if fused else None)


@pytest.mark.parametrize("n", [100, 3 * segments.SEGMENT_BYTES // 4 + 1])
def test_a_corrupted_segment_fails_its_whole_message(n):
    def rank_main(comm):
        t = transport(comm, [{"kind": "corrupt", "step": 1, "src": 0, "phase": "reduce_scatter"}],
                      deadline_s=5.0)
        ar = make_allreducer("ring", comm, t)
        ar.wait(ar.start(payload(1, n), 1, 0))
    errors = run_ranks(2, rank_main)
    assert all(isinstance(e, SyncError) for e in errors), errors
    assert "corrupted message from rank 0 (ring reduce_scatter, chunk 0)" in errors[0].message


def test_a_stale_duplicate_is_discarded():
    sizes = [(1, 5), (2, 5), (3, 5)]
    got, _, t1 = point_to_point(sizes, [{"kind": "duplicate", "step": 1}])
    assert [g.tolist() for g in got] == [payload(s, n).tolist() for s, n in sizes]
    assert t1.stats["stale_discarded"] == 1


@pytest.mark.parametrize("n", [5, 3 * INLINE_MAX])
def test_a_reordered_message_is_stashed_until_its_turn(n):
    sizes = [(1, n), (2, n), (3, n)]
    got, _, t1 = point_to_point(sizes, [{"kind": "reorder", "step": 1}])
    assert [g.tolist() for g in got] == [payload(s, n).tolist() for s, n in sizes]
    assert t1.stats["stale_discarded"] == 0 and t1.stats["received"] == 3


def test_a_delayed_message_goes_out_before_drain_returns():
    got, t0, _ = point_to_point([(1, 5), (2, 5)], [{"kind": "delay", "step": 1, "delay_ms": 30}])
    assert [g.tolist() for g in got] == [payload(s, 5).tolist() for s in (1, 2)]
    assert not t0.faults.pending()


def test_settle_waits_until_a_lent_payload_has_left():
    n = 3 * INLINE_MAX

    def rank_main(comm):
        t = transport(comm)
        if comm.Get_rank() == 0:
            buf = payload(1, n)
            t.send(mid(1), buf, borrow=True)
            t.settle()
            buf[:] = 0  # allowed once settle returned
            return t._borrowed
        time.sleep(0.05)  # the payload leaves only when this rank receives it
        return t.recv(mid(1), np.float32, n).copy()
    borrowed, got = run_ranks(2, rank_main)
    assert borrowed == [] and np.array_equal(got, payload(1, n))


def allreduce_results(p, n, delivery="strict", rules=(), algorithm="ring", steps=2):
    def rank_main(comm):
        t = transport(comm, rules, delivery=delivery)
        ar = make_allreducer(algorithm, comm, t)
        outs = []
        for step in range(1, steps + 1):
            buf = payload(step + comm.Get_rank(), n)
            ar.wait(ar.start(buf, step, 0))
            outs.append(buf)
        t.close()
        return outs, t
    return run_ranks(p, rank_main)


@pytest.mark.parametrize("algorithm", ["ring", "recursive_doubling", "tree"])
@pytest.mark.parametrize("p", [2, 3, 4])
# 1000: inline; the other: payloads in segments, chunks of unequal segment counts (p = 3:
# 2, 2 and 3 segments), sent from the buffer (borrow) and added segment by segment.
@pytest.mark.parametrize("n", [1000, (5 * segments.SEGMENT_BYTES) // 4 + 7])
def test_own_allreducers_over_the_fake_comm(algorithm, p, n):
    results = allreduce_results(p, n, algorithm=algorithm)
    for outs, _ in results:
        for step, got in enumerate(outs, 1):
            want = sum(payload(step + r, n).astype(np.float64) for r in range(p))
            assert np.allclose(got, want, rtol=1e-6)
            assert np.array_equal(got, results[0][0][step - 1])  # bitwise the same everywhere


def test_reliable_resends_a_dropped_message_and_the_bits_match_a_clean_run():
    clean = allreduce_results(3, 5000, delivery="reliable")
    faulty = allreduce_results(3, 5000, delivery="reliable",
                               rules=[{"kind": "drop", "step": 1, "src": 1, "count": 1},
                                      {"kind": "corrupt", "step": 2, "src": 2, "count": 1}])
    for (c, _), (f, t) in zip(clean, faulty):
        assert all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(c, f))
    stats = {k: sum(t.stats[k] for _, t in faulty) for k in faulty[0][1].stats}
    assert stats["retransmissions"] >= 2 and stats["recovery_s"] > 0
    assert stats["corrupt_detected"] == 1


def test_lossy_timeout_returns_none_counts_and_announces_the_loss():
    fabric, events = Fabric(2), []
    t = transport(fabric.comm(1), delivery="lossy", deadline_s=0.05, events=events)
    m = mid(4, src=0, dst=1)
    t0 = time.monotonic()
    assert t.recv(m, np.float32, 10) is None
    assert time.monotonic() - t0 >= 0.05
    assert t.lost == [m] and t.stats["lost"] == 1
    assert [e["event"] for e in events] == ["lost"] and events[0]["step"] == 4
    assert [e.tag for e in fabric.pending(0)] == [TAG_LOSS]
    assert t.evidence(4) == (StepEvidence([m], False, []))


def test_lossy_drop_is_a_tombstone_counted_absent_at_once():
    t_start = time.monotonic()
    got, _, t1 = point_to_point([(1, 5), (2, 5)], [{"kind": "drop", "step": 1}],
                                delivery="lossy", deadline_s=5.0)
    assert got[0] is None and np.array_equal(got[1], payload(2, 5))
    assert t1.lost == [mid(1)] and time.monotonic() - t_start < 2.0  # no deadline waited


def test_a_lossy_fence_still_fails_on_a_missing_peer():
    t = transport(Fabric(2).comm(1), delivery="lossy", deadline_s=0.05)
    with pytest.raises(SyncError, match="heard nothing from rank 0 at the step-end check"):
        t.fence(1)


@pytest.mark.parametrize("n", [5, 3 * INLINE_MAX])
def test_a_late_message_of_one_connection_is_never_taken_by_the_next(n):
    """Connection 1's duplicate of its message 0 is still on the way when connection 2 (on
    the same communicator) receives its own message 0, with the same identity: it must
    get connection 2's payload (each transport talks on its own duplicate)."""
    def rank_main(comm):
        first = transport(comm, [{"kind": "duplicate", "step": 1, "src": 0}])
        if comm.Get_rank() == 0:
            first.send(mid(1), payload(1, n))
        else:
            first.recv(mid(1), np.float32, n)  # the first copy; the duplicate stays queued
        first.close()
        second = transport(comm)
        if comm.Get_rank() == 0:
            second.send(mid(1), payload(2, n))
            second.close()
            return None
        got = second.recv(mid(1), np.float32, n).copy()
        second.close()
        return got
    _, got = run_ranks(2, rank_main)
    if isinstance(got, BaseException):
        raise got
    assert np.array_equal(got, payload(2, n))


@pytest.mark.parametrize("delivery", ["strict", "lossy"])
def test_close_waits_for_no_spare_copy_of_a_duplicated_large_message(monkeypatch, delivery):
    """The second copy of a duplicated message that is the last on its channel is not
    taken by the transport's receives: the receiver took the first and is done.  A large
    one completes only when taken (rendezvous), so its sender's close used to wait for it
    until the deadline (here 60 s, and every peer's next connection with it).  Now the
    receiver's close takes it (mpitrain.comm.closing) and both return at once."""
    monkeypatch.setattr(outbox, "_KEEP_ALIVE", [])
    n = 3 * INLINE_MAX  # beyond the fake's eager limit
    fabric = Fabric(2)

    def rank_main(comm):
        t = transport(comm, [{"kind": "duplicate", "step": 1, "src": 0}], delivery=delivery,
                      deadline_s=60.0)
        got = None
        if comm.Get_rank() == 0:
            t.send(mid(1), payload(1, n))
        else:
            got = t.recv(mid(1), np.float32, n).copy()
        t.close()
        return got
    _, got = run_ranks(2, rank_main, timeout=10.0, fabric=fabric)  # the old: "a rank hung"
    assert np.array_equal(got, payload(1, n))
    assert fabric.leftovers() == []
    assert not [q for q, _ in outbox._KEEP_ALIVE if not q.Test()]


# --------------------------------------------------------------- agreement
def test_corruption_is_one_agreed_error_naming_the_fault():
    def rank_main(comm):
        t = transport(comm, [{"kind": "corrupt", "step": 1, "src": 0}], deadline_s=5.0)
        ar = make_allreducer("ring", comm, t)
        ar.wait(ar.start(payload(1, 100), 1, 0))
    t0 = time.monotonic()
    errors = run_ranks(2, rank_main)
    assert time.monotonic() - t0 < 2.5  # rank 0 joined at once, not at its own deadline
    assert all(isinstance(e, SyncError) for e in errors), errors
    assert len({e.message for e in errors}) == 1 and {e.reporter for e in errors} == {1}
    for part in ("corrupted message from rank 0", "checksum mismatch",
                 "Injected fault: corrupt (bitflip) (rule 0)"):
        assert part in errors[0].message


def test_ranks_that_time_out_on_a_dead_rank_raise_the_same_error():
    def rank_main(comm):
        if comm.Get_rank() == 2:
            return None  # "dead": never sends
        t = transport(comm, deadline_s=(0.1, 5.0)[comm.Get_rank()])
        t.recv(mid(1, src=2, dst=comm.Get_rank()), np.float32, 4)
    t0 = time.monotonic()
    e0, e1, _ = run_ranks(3, rank_main)
    assert time.monotonic() - t0 < 2.5  # rank 1 joined rank 0's report, before its deadline
    assert isinstance(e0, SyncError) and isinstance(e1, SyncError)
    assert (e0.message, e0.reporter) == (e1.message, e1.reporter)
    assert "from rank 2" in e0.message


def report(reporter, priority=1, waited_on=None, waited=1.0):
    return {"reporter": reporter, "priority": priority, "waited_on": waited_on,
            "waited": waited, "message": f"from {reporter}", "hint": None}


@pytest.mark.parametrize("reports,winner", [
    ([report(0, 1, 3, 9.0), report(1, 2, None, 0.0)], 1),   # an injected fault beats a timeout
    ([report(0, 1, 1, 9.0), report(1, 1, 3, 2.0)], 1),      # waiting on a silent rank wins
    ([report(0, 1, 3, 2.0), report(1, 1, 3, 3.0)], 1),      # then the longest wait
    ([report(2, 1, 3, 2.0), report(1, 1, 3, 2.0)], 1),      # then the lowest reporter
])
def test_agreement_picks_the_same_report_in_any_order(reports, winner):
    for order in itertools.permutations(reports):
        assert agreed({r["reporter"]: r for r in order})["reporter"] == winner


# -------------------------------------------------------- transport state
def test_collective_wait_is_attributed_to_the_peer_waited_on():
    def rank_main(comm):
        t = transport(comm)
        if comm.Get_rank() == 0:
            time.sleep(0.05)
            t.send(mid(1), payload(1, 4))
            return None
        t.begin_collective(1, 0, "p2p")
        t.recv(mid(1), np.float32, 4)
        waited = t.collective_wait()
        t.add_wait(1.0)
        added = t.collective_wait()
        t.begin_collective(2, 0, "p2p")
        return waited, added, t.collective_wait()
    _, (waited, added, reset) = run_ranks(2, rank_main)
    assert waited[0] >= 0.04 and waited[1] == 0
    assert added == (pytest.approx(waited[0] + 1.0), 0) and reset == (0.0, None)


class Pending:
    def __init__(self, done=False):
        self.done = done

    def Test(self):
        return self.done


def test_buffers_kept_alive_after_close_are_pruned_and_bounded(monkeypatch):
    monkeypatch.setattr(outbox, "_KEEP_ALIVE", [])
    monkeypatch.setattr(outbox, "KEEP_ALIVE_MAX", 10)
    first = [(Pending(), b"x") for _ in range(4)]
    outbox.keep_alive(first)
    first[0][0].done = True
    outbox.keep_alive([(Pending(), b"y") for _ in range(20)])
    kept = outbox._KEEP_ALIVE
    assert len(kept) == 10 and all(b == b"y" for _, b in kept)
    outbox.keep_alive([])
    assert len(outbox._KEEP_ALIVE) == 10
    for q, _ in kept:
        q.done = True
    outbox.keep_alive([])
    assert outbox._KEEP_ALIVE == []


def test_bad_modes_are_refused_with_the_old_messages():
    comm = Fabric(2).comm(0)
    with pytest.raises(ValueError, match="delivery must be one of"):
        Transport(comm, delivery="eventual")
    with pytest.raises(ValueError, match="reliable delivery needs checksums"):
        Transport(comm, delivery="reliable", checksum=False)
