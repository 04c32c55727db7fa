"""What traffic accounting and the timeline ([trace]) cost a training step.

    mpiexec -n 2 python benchmarks/trace_overhead.py [--rounds 6] [--pairs 40] [--warmup 4]
        [--batch 64] [--set 'sync.algorithm="ring"']

The job is benchmarks/mlp.toml (MLP 784-1024-1024-10, synthetic data, SGD, float32, batch 64
per rank; native allreduce unless --set says otherwise), run through ``train.setup`` /
``train.run`` as ``mpitrain run`` does.  Two comparisons, each interleaved step by step inside
a run (on a shared machine the load drifts within seconds; neighbouring steps see the same):

(a) accounting  traffic accounting (comm/traffic.py, always on in mpitrain) against the same
                steps with its methods replaced by no-ops; [trace] off
(b) tracing     a traced step ([trace] steps covering the run, messages on) against an
                untraced one; accounting on

In a run, every other step is the variant and the steps between are the baseline (which
parity is the variant alternates from run to run); ``--rounds`` runs per comparison, one
after the other, each after ``--warmup`` steps not measured and with its last step (the
checkpoint) left out.  A step's time is the period between two step records (as
benchmarks/mpitrain_loop.py times it: everything the loop does per step).  Reported: the
median step time of each side, and the overhead as the median over all neighbouring pairs of
the ratio variant / baseline.  Then the hooks' own cost, timed alone and counted per step of
this job: what the accounting adds to a step, and what the trace hooks cost when tracing is
off (one attribute test per message, a call that does nothing per step-level hook).
Targets (issue 14): (a) under 2 % of a step, (b) under 10 %.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import timeit
from contextlib import contextmanager
from typing import Iterator

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mpitrain import config, train  # noqa: E402
from mpitrain.comm.traffic import Traffic  # noqa: E402
from mpitrain.context import RankContext  # noqa: E402
from mpitrain.metrics import Metrics, read_jsonl  # noqa: E402
from mpitrain.session import session  # noqa: E402
from mpitrain.trace import OFF, Tracer  # noqa: E402

ACCOUNTING = ("sent", "received", "retransmitted", "faulted", "allreduce")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="runs per comparison")
    ap.add_argument("--pairs", type=int, default=40, help="measured step pairs per run")
    ap.add_argument("--warmup", type=int, default=4, help="first steps of a run not measured")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="override a key of benchmarks/mlp.toml")
    return ap.parse_args()


class Accounting:
    """Switches Traffic's counting methods to no-ops and back (a step record then carries
    no traffic keys)."""

    def __init__(self) -> None:
        self.real = {name: getattr(Traffic, name) for name in (*ACCOUNTING, "take_step")}
        self.noop = {name: (lambda self, *args, **kw: None) for name in ACCOUNTING}
        self.noop["take_step"] = lambda self: {}

    def set(self, on: bool) -> None:
        for name, method in (self.real if on else self.noop).items():
            setattr(Traffic, name, method)


@contextmanager
def patched(cls, name: str, method) -> Iterator[None]:
    original = getattr(cls, name)
    setattr(cls, name, method)
    try:
        yield
    finally:
        setattr(cls, name, original)


def one_run(world, args, comparison: str, parity: int, out: str) -> list[float]:
    """Collective: one run whose steps of ``parity`` (step % 2) are the variant of
    ``comparison`` -- "a": accounting on (off in the others), "b": traced (the others not);
    returns every step's period (s): index k is step k + 2."""
    steps = args.warmup + 2 * args.pairs + 2
    sets = [f"data.batch_size={args.batch}", f"run.steps={steps}",
            f"run.out={json.dumps(out)}", *args.sets]
    if comparison == "b":
        sets.append(f'trace.steps="1-{steps}"')
    with world.collective_errors():
        cfg = config.load(os.path.join(HERE, "mlp.toml"), sets, world.env)
        ctx = RankContext.create(world, cfg, world.env)
        prepared = train.setup(ctx, cfg)
    ctx.connect(world)
    stamps: list[float] = []
    accounting = Accounting()
    record_step, begin_step = Metrics.step, Tracer.begin_step

    def step_record(self, record):  # stamp it; (a) set up the accounting of the next step
        record_step(self, record)
        stamps.append(timeit.default_timer())
        accounting.set(comparison != "a" or (record["step"] + 1) % 2 == parity)

    def traced_begin(self, step):  # (b) trace the steps of ``parity`` only
        begin_step(self, step)
        self.on = self.on and step % 2 == parity

    accounting.set(comparison != "a" or 1 % 2 == parity)
    try:
        with patched(Metrics, "step", step_record), patched(Tracer, "begin_step", traced_begin):
            train.run(ctx, cfg, prepared)
    finally:
        accounting.set(True)
    ctx.close()
    return [b - a for a, b in zip(stamps[:-1], stamps[1:])]


def pairs(periods: list[float], parity: int, warmup: int) -> list[tuple[float, float]]:
    """(variant, baseline) periods of neighbouring steps after the warm-up, without the last
    step (it writes the checkpoint)."""
    by_step = {k + 2: p for k, p in enumerate(periods)}
    last = max(by_step)
    out = []
    for k in range(warmup + 1, last - 1, 2):
        a, b = by_step[k], by_step[k + 1]
        out.append((a, b) if k % 2 == parity else (b, a))
    return out


def per_call(stmt, number: int = 200_000) -> float:
    """Seconds one call of ``stmt`` (a no-argument callable) costs, best of 5."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number


def hook_costs(record: dict, layers: int) -> dict[str, float]:
    """Seconds per step: the accounting of one step of this job (``record``: an accounting
    run's step record), and the trace hooks with tracing off."""
    t = Traffic(0, 2, modelled=record.get("traffic") == "modelled")
    empty = per_call(lambda: None)
    sent = per_call(lambda: t.sent(1, 0, 4096)) - empty
    received = per_call(lambda: t.received(4096)) - empty
    modelled = per_call(lambda: t.allreduce(0, 4096)) - empty
    take = per_call(t.take_step) - empty
    accounting = take + (layers * modelled if t.modelled else
                         record["messages_sent"] * sent + record["messages_received"] * received)
    test = per_call(lambda: OFF.on) - empty
    call = per_call(lambda: OFF.begin_step(1)) - empty

    def null_span() -> None:
        with OFF.span("x"):
            pass
    span = per_call(null_span) - empty
    # per step: begin/end step and backward (calls), forward, statistics, optimizer and the
    # gradient wait (spans); per bucket two tests in _start, one in layer_ready, a call in
    # finish; one test per message sent and per message accepted
    messages = record.get("messages_sent", 0) + record.get("messages_received", 0)
    trace_off = 3 * call + 4 * span + layers * (3 * test + call) + messages * test
    return {"accounting": accounting, "trace off": trace_off, "test": test, "call": call,
            "span": span, "sent": sent, "received": received}


def report(args, world, measured: dict[str, list[tuple[float, float]]],
           costs: dict[str, float], algorithm: str) -> None:
    print(f"trace_overhead: benchmarks/mlp.toml, {world.size} ranks, sync.algorithm "
          f"{algorithm}, batch {args.batch}/rank; per comparison {args.rounds} runs x "
          f"{args.pairs} pairs of neighbouring steps (variant, baseline)")
    base_step = statistics.median(b for _, b in measured["a"])
    for key, label, target in (("a", "(a) accounting on vs off, trace off", 2.0),
                               ("b", "(b) traced step vs untraced step", 10.0)):
        ps = measured[key]
        ratios = sorted(v / b for v, b in ps)
        q1, q3 = ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]
        print(f"  {label}: median step {1e3 * statistics.median(v for v, _ in ps):.3f} ms vs "
              f"{1e3 * statistics.median(b for _, b in ps):.3f} ms; overhead "
              f"{100 * (statistics.median(ratios) - 1):+.2f} % (median of {len(ratios)} pair "
              f"ratios, quartiles {100 * (q1 - 1):+.1f} .. {100 * (q3 - 1):+.1f} %); target "
              f"< {target:g} %")
    print(f"  hooks timed alone, per step of this job: accounting {1e6 * costs['accounting']:.2f}"
          f" us ({100 * costs['accounting'] / base_step:.4f} % of a step); trace hooks with "
          f"tracing off {1e6 * costs['trace off']:.2f} us "
          f"({100 * costs['trace off'] / base_step:.4f} %)")
    print(f"    per hook: attribute test {1e9 * costs['test']:.0f} ns, no-op call "
          f"{1e9 * costs['call']:.0f} ns, null span {1e9 * costs['span']:.0f} ns; Traffic.sent "
          f"{1e9 * costs['sent']:.0f} ns, Traffic.received {1e9 * costs['received']:.0f} ns")


def main() -> int:
    args = parse_args()
    job = config.load(os.path.join(HERE, "mlp.toml"), args.sets)
    with session() as world:
        base = world.comm.bcast(tempfile.mkdtemp(prefix="trace-overhead-")
                                if world.rank == 0 else None)
        measured: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
        for rnd in range(args.rounds):
            for comparison in ("a", "b"):
                parity = rnd % 2
                periods = one_run(world, args, comparison, parity,
                                  os.path.join(base, f"{comparison}{rnd}"))
                measured[comparison] += pairs(periods, parity, args.warmup)
        if world.rank == 0:
            record = [r for r in read_jsonl(os.path.join(base, "b0", "metrics.jsonl"))
                      if r.get("kind") == "step"][-1]
            report(args, world, measured, hook_costs(record, len(job.model.layers)),
                   job.sync.algorithm)
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
