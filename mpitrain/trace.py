"""Timeline of chosen steps: every rank's spans, messages and events, as one Perfetto trace.

``[trace] steps = "A-B"`` records on every rank what happens during steps A to B; at the end
of the run rank 0 writes them all into ``OUT/trace.json`` in the JSON object format of the
Trace Event Format, which https://ui.perfetto.dev and chrome://tracing open
(:mod:`mpitrain.trace_file`).  One process per rank ("rank r"); its threads are tracks:

==========================  ================================================================
"compute" (tid 0)           "step N" around each step; "forward" (the batch, forward pass and
                            loss), "backward layer i", "optimizer", "checkpoint"
"communication" (tid 1)     "wait for gradients" (:meth:`GradientSync.finish`), "wait for
                            statistics", "end-to-end check", "replica check", "fence"
"allreduce layer L"         each bucket's allreduce from its start to its completion (named by
(tid 10 + L)                its lowest layer L) and, for the own algorithms, its phases
                            (reduce_scatter, allgather, exchange, reduce, broadcast)
flow "s" -> "f"             each message: sent (sender's track) -> accepted, or counted absent
                            in lossy delivery (receiver's track)
instant "i"                 injected faults (cat "fault", with their kind), retransmissions,
                            corruptions detected, messages counted absent and errors (cat
                            "error"), replicas found equal (cat "check")
==========================  ================================================================

Times are microseconds of each rank's ``perf_counter``, moved onto rank 0's clock by the
offset measured at start (:func:`~mpitrain.comm.ledger.measure_clock_offset`, as the ledger
does) and counted from rank 0's clock at start.  A message's flow id is unique in the job,
(sequence number x P + source) x P + destination: both ends count the messages of a channel,
so both derive the same id, and a retransmission (same number) joins its first send.

Cost: with tracing off the tracer is :data:`OFF` and, outside the chosen steps, a
:class:`Tracer` whose ``on`` is False: every per-message hook is one attribute test
(``if tracer.on:``), every per-step hook a call that does nothing.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from mpitrain import trace_file
from mpitrain.comm.ledger import measure_clock_offset
from mpitrain.comm.wire import (H_CHUNK, H_LAYER, H_PHASE, H_SEQ, HEADER, PHASE_CODES,
                                MessageId, Packet, payload_bytes)
from mpitrain.errors import ConfigError

if TYPE_CHECKING:
    from mpitrain.comm.guarded import GuardedComm
    from mpitrain.config import JobConfig

TRACE_CHECK = "the timeline"  # names the tracer's collectives when a rank is missing

COMPUTE, COMM, ALLREDUCE = 0, 1, 10  # track ids; a bucket's allreduce: ALLREDUCE + its layer
PHASE_NAMES = {code: name for name, code in PHASE_CODES.items()}


class _NullSpan:
    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


NULL_SPAN = _NullSpan()


class NoTrace:
    """Tracing off: ``on`` is always False and every hook does nothing.

    The hooks are called by the loop (train.py, per step), the synchronizer (sync.py, per
    bucket) and the transport (per message, only ``if tracer.on``)."""

    on = False

    def span(self, name: str, tid: int = COMPUTE, cat: str = "", **args: Any) -> Any:
        """A context manager timing its block as span ``name`` on track ``tid``."""
        return NULL_SPAN

    def backward(self, layers: Iterable[int]) -> Iterable[int]:
        """``layers`` (the model's backward pass), each layer's backward timed as a span."""
        return layers

    def begin_step(self, step: int) -> None:
        """The loop starts ``step`` (tracing turns on inside the window)."""

    def end_step(self, step: int) -> None:
        """The loop ends ``step``, its end-of-step duties done (tracing turns off)."""

    def instant(self, name: str, tid: int, cat: str, **args: Any) -> None:
        """An instant event now."""

    def allreduce_starting(self, lo: int, hi: int, nbytes: int, algorithm: str) -> None:
        """The allreduce of bucket ``lo..hi`` (``nbytes``) starts now ..."""

    def allreduce_started(self, handle: Any) -> None:
        """... and has started: ``handle.done`` says when it is complete (the own algorithms
        complete inside their start), see :meth:`allreduces_done`."""

    def allreduces_done(self) -> None:
        """Close the spans of the started allreduces that are done now."""

    def sent(self, mid: MessageId, seq: int, nbytes: int) -> None:
        """Message ``mid``, number ``seq`` on its channel, is sent (first transmission)."""

    def accepted(self, mid: MessageId, seq: int, nbytes: int) -> None:
        """Message ``mid`` (number ``seq``) is accepted by its receiver."""

    def absent(self, mid: MessageId, seq: int) -> None:
        """Message ``mid`` (number ``seq``) is counted absent by its receiver (lossy)."""

    def retransmitted(self, dst: int, pkt: Packet) -> None:
        """Packet ``pkt`` is sent again to ``dst`` (reliable delivery)."""

    def fault(self, mid: MessageId, kind: str, rule: int) -> None:
        """An injected fault of ``kind`` (rule number ``rule``) hits message ``mid``."""

    def rank_fault(self, kind: str, layer: int) -> None:
        """An injected "slow" or "crash" fault hits this rank at layer ``layer``'s collective."""

    def corrupt(self, mid: MessageId) -> None:
        """Message ``mid`` arrived with a payload that fails its checksum."""

    def error(self, exc: BaseException) -> None:
        """An error was raised (recorded once however many spans it leaves)."""

    def finish(self, guard: GuardedComm, step: int) -> None:
        """Collective, at the end of a run (``step``, its last): rank 0 writes trace.json.
        ``guard``: the rank's guarded collectives (a rank missing is named, not waited for)."""

    def fail(self, err: BaseException) -> None:
        """The run ends with ``err`` on this rank: keep what was recorded (no communication)."""


OFF = NoTrace()


class _Span:
    __slots__ = ("tracer", "name", "tid", "cat", "args", "t0")

    def __init__(self, tracer: Tracer, name: str, tid: int, cat: str, args: dict):
        self.tracer, self.name, self.tid, self.cat, self.args = tracer, name, tid, cat, args
        self.t0 = 0.0

    def __enter__(self) -> _Span:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        self.tracer.complete(self.name, self.t0, self.tid, self.cat, **self.args)
        if exc is not None:  # the error where it happened (it goes on)
            self.tracer.error(exc)


class Tracer(NoTrace):
    """Records the chosen steps ``window`` = (first, last) of rank ``rank`` of ``size``.

    ``messages``: record every message as a flow; ``offset_s``: added to this rank's
    ``time.time()`` reads rank 0's clock; ``origin_s``: rank 0's time that is 0 in the trace.
    ``meta``: what the trace's metadata says of the job; ``out``: the run folder that
    trace.json goes into (:mod:`mpitrain.trace_file`).
    """

    def __init__(self, rank: int, size: int, window: tuple[int, int], *, messages: bool = True,
                 offset_s: float = 0.0, origin_s: float | None = None, out: Path = Path("."),
                 meta: dict | None = None):
        self.rank, self.size, self.messages = rank, size, messages
        self.first, self.last = window
        self.out, self.meta, self.offset_s = out, dict(meta or {}), offset_s
        wall, perf = time.time(), time.perf_counter()
        self.origin_s = wall + offset_s if origin_s is None else origin_s
        self._shift = wall + offset_s - self.origin_s - perf  # perf_counter -> trace seconds
        self.on = False
        self.traced = False  # a step of the window began
        self.events: list[dict] = []
        self.tracks: dict[int, str] = {COMPUTE: "compute", COMM: "communication"}
        self.step = 0
        self._step_t0 = 0.0
        self._phase: tuple[int, str] | None = None  # (layer, phase) of the open phase span
        self._phase_t0 = 0.0
        self._starting: tuple | None = None  # the allreduce inside its start
        self._open: list[tuple] = []  # allreduces started, not yet seen done
        self._errors: list[BaseException] = []  # recorded already

    # ------------------------------------------------------------------ recording
    def us(self, perf: float) -> float:
        """A ``perf_counter`` reading as trace time (microseconds on rank 0's clock)."""
        return round((perf + self._shift) * 1e6, 3)

    def complete(self, name: str, t0: float, tid: int = COMPUTE, cat: str = "compute",
                 t1: float | None = None, **args: Any) -> None:
        """Span ``name`` from ``t0`` to ``t1`` (perf_counter; default now) on track ``tid``."""
        ts = self.us(t0)
        end = self.us(time.perf_counter() if t1 is None else t1)
        self.events.append({"ph": "X", "name": name, "cat": cat, "pid": self.rank, "tid": tid,
                            "ts": ts, "dur": round(end - ts, 3),
                            "args": {"step": self.step, **args}})

    def instant(self, name: str, tid: int, cat: str, **args: Any) -> None:
        self.events.append({"ph": "i", "s": "t", "name": name, "cat": cat, "pid": self.rank,
                            "tid": tid, "ts": self.us(time.perf_counter()),
                            "args": {"step": self.step, **args}})

    def span(self, name: str, tid: int = COMPUTE, cat: str = "", **args: Any) -> Any:
        if not self.on:
            return NULL_SPAN
        return _Span(self, name, tid, cat or ("compute" if tid == COMPUTE else "communication"),
                     args)

    def backward(self, layers: Iterable[int]) -> Iterable[int]:
        return self._timed_backward(layers) if self.on else layers

    def _timed_backward(self, layers: Iterable[int]) -> Iterator[int]:
        t0 = time.perf_counter()
        for layer in layers:
            self.complete(f"backward layer {layer}", t0, layer=layer)
            yield layer  # the synchronizer's turn: not part of the layer's backward
            t0 = time.perf_counter()

    def error(self, exc: BaseException) -> None:
        if not self.on or not isinstance(exc, Exception) or any(e is exc for e in self._errors):
            return
        self._errors.append(exc)
        self.instant("error", COMM, "error", error=type(exc).__name__,
                     message=getattr(exc, "message", str(exc)))

    # ------------------------------------------------------------------ the window
    def begin_step(self, step: int) -> None:
        self.on = self.first <= step <= self.last
        if self.on:
            self.traced = True
            self.step, self._step_t0 = step, time.perf_counter()

    def end_step(self, step: int) -> None:
        if self.on:
            self.complete(f"step {step}", self._step_t0, cat="step")
            self.on = False

    def close_open(self, reason: str) -> None:
        """A failure ends the window: close the open spans (allreduce, phase, step) now,
        marked with ``reason``, so the trace shows what never finished."""
        if not self.on:
            return
        now = time.perf_counter()
        self._close_phase(now)
        if self._starting is not None:
            self._open.append((*self._starting, None))
            self._starting = None
        for lo, hi, nbytes, algorithm, t0, _ in self._open:
            self.complete(f"{algorithm} allreduce", t0, ALLREDUCE + lo, "allreduce", t1=now,
                          layers=f"{lo}..{hi}", bytes=nbytes, unfinished=reason)
        self._open = []
        self.complete(f"step {self.step}", self._step_t0, cat="step", t1=now, unfinished=reason)
        self.on = False

    # ------------------------------------------------------------------ allreduces
    def allreduce_starting(self, lo: int, hi: int, nbytes: int, algorithm: str) -> None:
        if hi > lo:
            self.tracks[ALLREDUCE + lo] = f"allreduce layers {lo}..{hi}"
        self._starting = (lo, hi, nbytes, algorithm, time.perf_counter())

    def allreduce_started(self, handle: Any) -> None:
        if self._starting is not None:
            self._open.append((*self._starting, handle))
            self._starting = None
        self.allreduces_done()

    def allreduces_done(self) -> None:
        if not self._open:
            return
        now = time.perf_counter()
        done = [entry for entry in self._open if entry[5].done]
        for lo, hi, nbytes, algorithm, t0, _ in done:
            if self._phase is not None and self._phase[0] == lo:
                self._close_phase(now)
            self.complete(f"{algorithm} allreduce", t0, ALLREDUCE + lo, "allreduce", t1=now,
                          layers=f"{lo}..{hi}", bytes=nbytes)
        if done:
            self._open = [entry for entry in self._open if not any(entry is d for d in done)]

    def _track(self, layer: int) -> int:
        return ALLREDUCE + layer if layer >= 0 else COMM  # fences: the transport's own

    def _message_track(self, mid: MessageId, now: float) -> int:
        """The track of a message, opening its phase's span at its first message."""
        if mid.layer < 0:
            return COMM
        if self._phase != (mid.layer, mid.phase):
            self._close_phase(now)
            self._phase, self._phase_t0 = (mid.layer, mid.phase), now
        return ALLREDUCE + mid.layer

    def _close_phase(self, now: float) -> None:
        if self._phase is not None:
            layer, phase = self._phase
            self.complete(phase, self._phase_t0, ALLREDUCE + layer, "phase", t1=now)
            self._phase = None

    # ------------------------------------------------------------------ messages
    def flow_id(self, src: int, dst: int, seq: int) -> int:
        """The id joining message ``seq`` of channel ``src -> dst`` to its receipt."""
        return (seq * self.size + src) * self.size + dst

    def sent(self, mid: MessageId, seq: int, nbytes: int) -> None:
        now = time.perf_counter()
        tid = self._message_track(mid, now)
        if self.messages:
            self.events.append({
                "ph": "s", "name": mid.phase, "cat": "message",
                "id": self.flow_id(mid.src, mid.dst, seq), "pid": self.rank, "tid": tid,
                "ts": self.us(now), "args": {"step": mid.step, "layer": mid.layer, "to": mid.dst,
                                             "chunk": mid.chunk, "seq": seq, "bytes": nbytes}})

    def accepted(self, mid: MessageId, seq: int, nbytes: int) -> None:
        self._arrived(mid, seq, bytes=nbytes)

    def absent(self, mid: MessageId, seq: int) -> None:
        self.instant("counted absent", self._track(mid.layer), "error", **self._where(mid))
        self._arrived(mid, seq, absent=True)

    def _arrived(self, mid: MessageId, seq: int, **args: Any) -> None:
        now = time.perf_counter()
        tid = self._message_track(mid, now)
        if self.messages:
            self.events.append({
                "ph": "f", "bp": "e", "name": mid.phase, "cat": "message",
                "id": self.flow_id(mid.src, mid.dst, seq), "pid": self.rank, "tid": tid,
                "ts": self.us(now), "args": {"step": mid.step, "layer": mid.layer,
                                             "from": mid.src, "chunk": mid.chunk, "seq": seq,
                                             **args}})

    @staticmethod
    def _where(mid: MessageId) -> dict[str, Any]:
        return {"layer": mid.layer, "phase": mid.phase, "chunk": mid.chunk, "src": mid.src,
                "dst": mid.dst}

    def retransmitted(self, dst: int, pkt: Packet) -> None:
        hdr = HEADER.unpack_from(pkt[0])
        layer = hdr[H_LAYER]
        self.instant("retransmission", self._track(layer), "retransmission", dst=dst,
                     seq=hdr[H_SEQ], layer=layer, phase=PHASE_NAMES.get(hdr[H_PHASE]),
                     chunk=hdr[H_CHUNK], bytes=payload_bytes(pkt))

    def fault(self, mid: MessageId, kind: str, rule: int) -> None:
        self.instant(f"injected {kind}", self._track(mid.layer), "fault", kind=kind, rule=rule,
                     **self._where(mid))

    def rank_fault(self, kind: str, layer: int) -> None:
        self.instant(f"injected {kind}", self._track(layer), "fault", kind=kind, layer=layer)

    def corrupt(self, mid: MessageId) -> None:
        self.instant("corruption detected", self._track(mid.layer), "error", **self._where(mid))

    # ------------------------------------------------------------------ output
    def part(self) -> dict[str, Any]:
        """This rank's trace: a trace file of its own, which :func:`trace_file.combine` merges."""
        tracks = {tid: self.tracks.get(tid, f"allreduce layer {tid - ALLREDUCE}")
                  for tid in {e["tid"] for e in self.events} | {COMPUTE, COMM}}
        return trace_file.document(
            self.events + trace_file.names(self.rank, tracks),
            {**self.meta, "rank": self.rank, "clock_offset_s": self.offset_s})

    def finish(self, guard: GuardedComm, step: int) -> None:
        parts = guard.gather(self.part() if self.traced else None, TRACE_CHECK, step)
        if parts is not None:
            trace_file.write(self.out, parts)

    def fail(self, err: BaseException) -> None:
        if not self.traced:
            return
        self.error(err)
        self.close_open(type(err).__name__)
        trace_file.write_part(self.out, self.rank, self.part())
        if self.rank == 0 and not isinstance(err, SystemExit):  # a crash does not wait
            trace_file.merge(self.out, self.size, trace_file.PART_WAIT_S)


def start(cfg: JobConfig, guard: GuardedComm, out: Path, ledger: Any = None) -> NoTrace:
    """The tracer a job asks for: :data:`OFF`, or (``[trace] steps`` set) a :class:`Tracer`
    writing into ``out``.  Collective when tracing, on ``guard``'s communicator (every rank
    arrived at a guarded collective just before): it measures this rank's clock offset to
    rank 0, unless ``ledger`` (a :class:`~mpitrain.comm.ledger.Ledger`) already did."""
    window = cfg.trace.window
    if window is None:
        return OFF
    comm = guard.comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if ledger is not None:
        offset = ledger.offset
    else:
        offset = measure_clock_offset(comm) if size > 1 else 0.0
    origin = guard.bcast(time.time() if rank == 0 else None, TRACE_CHECK, 0)
    meta = {"job": cfg.name, "ranks": size, "steps": f"{window[0]}-{window[1]}",
            "algorithm": cfg.sync.algorithm, "delivery": cfg.faults.delivery,
            "messages": cfg.trace.messages, "clock_origin_unix_s": origin,
            "clock": "microseconds since clock_origin_unix_s on rank 0's clock: each rank's "
                     "own clock plus its measured offset"}
    return Tracer(rank, size, window, messages=cfg.trace.messages, offset_s=offset,
                  origin_s=origin, out=out, meta=meta)


def check_window(cfg: JobConfig, total_steps: int, where: str) -> None:
    """Refuse a trace window that starts after the run's last step (nothing would be traced)."""
    window = cfg.trace.window
    if window is not None and window[0] > total_steps:
        raise ConfigError(f"{where}: [trace] steps = \"{cfg.trace.steps}\": the run has "
                          f"{total_steps} steps, so nothing would be traced",
                          hint=f"choose steps between 1 and {total_steps}")
