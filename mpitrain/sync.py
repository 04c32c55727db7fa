"""Per-layer gradient synchronization: start each layer's allreduce as soon as it is ready.

Protocol, on every rank, in the same order (collectives must match across ranks):

    sync.begin(step)
    for i in model.backward(dz):      # last layer first
        sync.layer_ready(i)           # overlap on: starts layer i's allreduce now
    waited = sync.finish()            # every gradient buffer now holds the global mean
    # sync.comm_s: the seconds this step spent in communication calls outside finish

Each rank hands in gradients already weighted by 1/(samples in the global batch) -- its
share of the mean -- so the SUM the allreduce computes is the mean over the global batch
and no extra pass over the gradients is needed (see train.py).  With overlap off, nothing
is sent during backward and ``finish`` reduces the layers one after another (last layer
first), which is the reference to measure overlap against.

Buckets (``[sync] bucket_bytes``): consecutive layers can be fused into one allreduce, so
small layers stop paying a collective's latency each (the model keeps its gradients in one
arena, last layer first, so a bucket is a contiguous slice: no packing).  A bucket starts
once its lowest layer is ready and is *named by that layer* in messages, fault rules, the
ledger and errors; the end-to-end sum checks stay per layer.  With the default 0 every layer
is its own bucket: one allreduce per layer.

Why poke: MPI implementations without an asynchronous progress thread (MPICH's default)
only advance a non-blocking collective while the process is inside an MPI call.  Testing
the outstanding requests between layers lets layer k's reduction run during the backward
of layer k-1 instead of all of it piling up in ``finish``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection

from .backend import on_gpu, pinned_like, to_host
from .comm.allreduce import make_allreducer
from .comm.checks import SumCheck, check_replicas
from .comm.faults import FaultInjector, FaultPlan
from .comm.guarded import GuardedComm
from .comm.ledger import Ledger
from .comm.traffic import Traffic
from .comm.transport import Transport
from .trace import COMM, OFF, NoTrace
from .trace import start as start_trace

if TYPE_CHECKING:
    from .config import JobConfig
    from .context import RankContext
    from .model import MLP


class GradientSync:
    """Averages a fixed list of flat gradient buffers across ranks, one bucket at a time.

    ``buffers[i]`` is layer i's flat gradient.  ``buckets`` lists the fused allreduces as
    ``(lo, hi, span)``, last layer first, ``span`` being one contiguous view over the
    gradients of layers lo..hi (see :func:`mpitrain.model.plan_buckets`); by default every
    layer is its own bucket.  A bucket starts when layer ``lo`` -- the last of its layers
    that backward finishes -- is ready, and is named by ``lo``.  ``transport`` (own
    algorithms) and ``sum_check`` (lossy delivery, fault plans) are optional; see
    :func:`build`.  ``tracer``: the timeline of chosen steps (:mod:`mpitrain.trace`), which
    the loop also uses.  ``guard``: the deadline-guarded native collectives of the checks
    (:mod:`mpitrain.comm.guarded`; by default on the allreducer's communicator, with the
    transport's error channel), which the loop's own checks use too.
    """

    def __init__(self, allreducer, buffers: list, overlap: bool = True,
                 transport=None, sum_check=None, buckets: list | None = None,
                 traffic: Traffic | None = None, tracer: NoTrace = OFF,
                 guard: GuardedComm | None = None):
        self.allreducer, self.buffers, self.overlap = allreducer, buffers, overlap
        self.tracer = tracer
        self.transport, self.sum_check = transport, sum_check
        # the checks' native collectives, with the deadline and the transport's error channel
        self.guard = guard if guard is not None else GuardedComm(
            allreducer.comm, transport.agreement if transport is not None else None,
            allreducer.deadline_s, allreducer.oversubscribed)
        # what the reductions put on the network: measured by the transport for the own
        # algorithms, modelled here for native MPI (see comm/traffic.py)
        self.traffic = traffic if traffic is not None else \
            Traffic(allreducer.rank, allreducer.size, modelled=allreducer.name == "native")
        self.buckets = buckets or [(i, i, buffers[i]) for i in range(len(buffers) - 1, -1, -1)]
        self._by_lo = {lo: k for k, (lo, _, _) in enumerate(self.buckets)}
        self.step = 0
        self.comm_s = 0.0  # this step's seconds in layer_ready / verify (see begin)
        self._fenced = 0  # the last step fenced: no transport traffic since
        self._pending: list = []
        # GPU buffers travel through pinned host copies: the MPI from PyPI is not CUDA-aware.
        self._host = ([pinned_like(span) for _, _, span in self.buckets]
                      if buffers and on_gpu(buffers[0]) else None)
        self._layer_wire = self._layer_views(self._host) if self._host else list(buffers)
        self._check_buckets()

    def _check_buckets(self) -> None:
        """The buckets must cover every layer once, and (on the CPU) each span must BE its
        layers' gradients: reducing a copy would leave the real gradients unaveraged."""
        layers = sorted(i for lo, hi, _ in self.buckets for i in range(lo, hi + 1))
        if layers != list(range(len(self.buffers))):
            raise ValueError(f"buckets {[(lo, hi) for lo, hi, _ in self.buckets]} do not cover "
                             f"layers 0..{len(self.buffers) - 1} once each")
        for lo, hi, span in self.buckets:
            want = sum(self.buffers[i].size for i in range(lo, hi + 1))
            if span.size != want:
                raise ValueError(f"the span of layers {lo}..{hi} has {span.size} elements, "
                                 f"its layers {want}")
        if self._host is None:
            views = self._layer_views([span for _, _, span in self.buckets])
            for i, (view, buf) in enumerate(zip(views, self.buffers)):
                if view.__array_interface__["data"][0] != buf.__array_interface__["data"][0]:
                    raise ValueError(f"the bucket span of layer {i} is not its gradient "
                                     f"buffer (a span must be a view of its layers' gradients, "
                                     f"last layer first)")

    def _layer_views(self, spans: list) -> list:
        """Per-layer views into the bucket-sized ``spans`` (layers lie last first in a span)."""
        views = [None] * len(self.buffers)
        for (lo, hi, _), span in zip(self.buckets, spans):
            at = 0
            for layer in range(hi, lo - 1, -1):
                n = self.buffers[layer].size
                views[layer], at = span[at:at + n], at + n
        return views

    def _start(self, k: int):
        """Start bucket ``k``'s allreduce on the buffer MPI sees: the span, or its host copy."""
        lo, hi, wire = self.buckets[k]
        if self._host is not None:
            wire.get(out=self._host[k])
            wire = self._host[k]
        if self.sum_check is not None:
            for layer in range(lo, hi + 1):
                self.sum_check.before(layer, self._layer_wire[layer])
        if self.traffic.modelled:
            self.traffic.allreduce(lo, wire.nbytes)
        if self.tracer.on:
            self.tracer.allreduce_starting(lo, hi, wire.nbytes, self.allreducer.name)
        handle = self.allreducer.start(wire, self.step, lo)
        if self.tracer.on:
            self.tracer.allreduce_started(handle)
        return handle

    def begin(self, step: int) -> None:
        """Start a step: no bucket is outstanding.

        ``comm_s`` restarts at 0 and then counts the seconds this rank spends inside
        communication calls *outside* ``finish``: starting and advancing reductions during
        the backward pass (for own algorithms that includes the chunks they send and reduce
        there) and the end-to-end checks of ``verify``.  ``finish`` returns the rest, the
        time blocked waiting.  So a step splits into compute, communication and waiting.
        """
        assert not self._pending, "finish() was not called for the previous step"
        self.step = step
        self.comm_s = 0.0

    def layer_ready(self, layer: int) -> None:
        """Layer ``layer``'s gradients are final; with overlap on, start its bucket's
        allreduce if this was the bucket's last layer to be ready, and poke the others."""
        if not self.overlap:
            return
        t0 = time.perf_counter()
        k = self._by_lo.get(layer)
        if k is not None:
            self._pending.append(self._start(k))
        for handle in self._pending:
            self.allreducer.test(handle)
        if self.tracer.on:
            self.tracer.allreduces_done()
        self.comm_s += time.perf_counter() - t0

    def finish(self) -> float:
        """Complete every bucket's reduction (the global mean); return the seconds waited."""
        t0 = time.perf_counter()
        with self.tracer.span("wait for gradients", COMM, "wait"):
            if self.overlap:
                for handle in self._pending:
                    self.allreducer.wait(handle)
                    self.tracer.allreduces_done()
            else:
                for k in range(len(self.buckets)):
                    self.allreducer.wait(self._start(k))
                    self.tracer.allreduces_done()
        self._pending.clear()
        waited = time.perf_counter() - t0
        if self.sum_check is not None:
            for layer, wire in enumerate(self._layer_wire):
                self.sum_check.after(layer, wire)
        if self._host is not None:
            for (_, _, span), host in zip(self.buckets, self._host):
                span.set(host)
        return waited

    def verify(self, step: int) -> None:
        """Collective, after ``finish``: the end-to-end checks of this step, if enabled.

        Raises NumericsError if a reduced gradient holds NaN/Inf (naming the layer and the
        rank it came from), ReductionError / DivergenceError if a contribution was lost.
        """
        if self.sum_check is None:
            return
        t0 = time.perf_counter()
        try:  # counted even when a check raises and on_divergence = "warn" goes on
            with self.tracer.span("end-to-end check", COMM, "check"):
                # The checks use native collectives: a rank that failed in the transport is
                # heard of first; one that dies or sticks after the fence, at the deadline.
                self.fence(step)
                self.sum_check.verify_finite(self.guard, step)
                seen = self.transport.evidence(step)
                self.sum_check.verify(self.guard, step, seen.lost, checksums=seen.checksums,
                                      told=seen.told,
                                      fused={lo: hi for lo, hi, _ in self.buckets if hi > lo})
        finally:
            self.comm_s += time.perf_counter() - t0

    def fence(self, step: int) -> None:
        """Collective: before a native collective that follows own-algorithm traffic, make
        sure no rank is failing (a rank that is would otherwise leave the others in MPI)."""
        if self.transport is not None and self._fenced != step:
            with self.tracer.span("fence", COMM, "check"):
                self.transport.fence(step)
            self._fenced = step

    def close(self) -> dict:
        """Finish outstanding transport work; return the transport's counters (or {})."""
        if self.transport is None:
            return {}
        self.transport.close()
        return dict(self.transport.stats)

    def close_ledger(self) -> None:
        """Write out and close the collective ledger (local; on every way out of a run)."""
        ledger = self.allreducer.ledger
        if ledger is not None:
            ledger.close()


def build(ctx: RankContext, cfg: JobConfig, out: Path, model: MLP,
          events: Callable[[dict], None], crashed: Collection[int] = ()) -> GradientSync:
    """The synchronizer a job asks for: buckets, algorithm, transport, fault plan, ledger,
    checks, for the gradients of ``model``.

    Collective (the ledger and the tracer measure clock offsets).  ``events`` receives each
    injected fault and loss as a dict; ``crashed``: the crash rules that already killed this
    rank earlier in the run (a resumed run), which do not fire again.  Native MPI allreduce gets
    no transport unless a fault plan has rank-level faults (crash, slow), which act at the
    start of a collective.
    """
    f = cfg.faults
    rules = f.rules
    injector = FaultInjector(FaultPlan(rules, f.seed), ctx.rank, events, crashed) \
        if rules else None
    # The clock measurements below block in MPI: meet (with a deadline) first, so a rank
    # stuck before them (rank 0 writing the run's files, say) is named, not waited for.
    ctx.guard.barrier("the start of training", 0)
    ledger = Ledger(out, ctx.rank, ctx.size, ctx.comm) if cfg.sync.ledger else None
    tracer = start_trace(cfg, ctx.guard, out, ledger)
    transport = None
    traffic = Traffic(ctx.rank, ctx.size, modelled=cfg.sync.algorithm == "native")
    if cfg.sync.algorithm != "native" or injector is not None:
        transport = Transport(ctx.comm, delivery=f.delivery, deadline_s=f.deadline_ms / 1e3,
                              injector=injector, ledger=ledger, events=events,
                              checksum=f.checksum, oversubscribed=ctx.oversubscribed,
                              traffic=traffic, tracer=tracer)
    allreducer = make_allreducer(cfg.sync.algorithm, ctx.comm, transport, ledger=ledger,
                                 deadline_s=f.deadline_ms / 1e3,
                                 oversubscribed=ctx.oversubscribed)
    checks = SumCheck() if transport is not None and (f.delivery == "lossy" or rules) else None
    buckets = [(lo, hi, model.grad_span(lo, hi)) for lo, hi in model.buckets(cfg.sync.bucket_bytes)]
    # without a transport the checks use the rank's guard: one error channel per communicator
    return GradientSync(allreducer, [g.flat for g in model.grads], cfg.sync.overlap, transport,
                        checks, buckets, traffic, tracer,
                        guard=ctx.guard if transport is None else None)


def verify_replicas(guard: GuardedComm, params: list, step: int, tracer: NoTrace = OFF) -> None:
    """Collective: raise DivergenceError on every rank if the replicas' parameters differ.

    ``params`` are the per-layer flat parameter buffers (host or GPU); ``step`` 0 means
    before the first step.  Names the first differing layer and the ranks that differ.
    ``guard`` (a synchronizer's :attr:`GradientSync.guard`): a rank that does not arrive
    within the deadline makes every other rank raise a SyncError naming it.
    """
    with tracer.span("replica check", COMM, "check"):
        check_replicas(guard, [[to_host(p, copy=False)] for p in params], step)
    tracer.instant("replicas equal", COMM, "check")
