"""Metrics, progress and events of a run (rank 0 writes; other ranks keep silent).

``metrics.jsonl`` has one JSON object a line:

* ``{"kind": "step", "step", "epoch", "loss", "accuracy", "correct", "lr", "samples",
  "time_compute", "time_comm", "time_wait", "time_total", "samples_per_s"}`` -- every
  step; ``loss`` is the mean over the global batch, times are rank 0's seconds: computing,
  inside communication calls during the step (starting and advancing the gradient
  reductions while backward runs, end-to-end checks), blocked waiting for gradient
  communication after backward, and the whole step (the first three add up to it);
* ``{"kind": "epoch", "step", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"}`` --
  at the end of each epoch (train figures are means over the epoch's samples; ``val_*`` are
  null when validation is off).

``events.jsonl`` records what happened to the run (faults injected, retransmissions,
checks, resume, preemption), one object a line with at least ``event`` and ``step``.
Epochs count from 0, steps from 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import checkpoint
from .comm import outcome

if TYPE_CHECKING:  # not at run time: it imports mpi4py.MPI (MPI_Init)
    from .comm.guarded import GuardedComm


def fmt(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` decimals for the user, never "-0.0000": a loss or accuracy that
    rounds to zero prints as 0 whatever its sign (a perfect cross-entropy is -0.0, and
    -1e-9 from rounding is no loss below zero).  Every loss and accuracy a command prints
    goes through here."""
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


class Metrics:
    """Writes metrics and events on rank 0 and drives the progress display."""

    def __init__(self, out: Path, active: bool, progress: str, total_steps: int,
                 log_every: int, start_step: int = 0):
        self.active, self.total, self.log_every = active, total_steps, log_every
        self.out = out
        self._bar: Any = None
        self._plain = False
        self._window = [0, 0.0]  # samples and seconds since the last plain progress line
        self._rate: float | None = None  # moving average of samples/s for the progress bar
        self._progress = progress
        if active:
            self._open(start_step)

    def _open(self, start_step: int, keep_events: bool = False) -> None:
        """Open the files, dropping records of steps after ``start_step`` (events too, unless
        ``keep_events``); start the display."""
        self.out.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.out / "metrics.jsonl", start_step)
        if not keep_events:
            _truncate_after(self.out / "events.jsonl", start_step)
        self._metrics = open(self.out / "metrics.jsonl", "a", buffering=1)
        self._events = open(self.out / "events.jsonl", "a", buffering=1)
        tty = sys.stderr.isatty()
        if self._progress == "bar" or (self._progress == "auto" and tty):
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=0.2)
        self._plain = self._progress == "plain" or (self._progress == "auto" and not tty)

    def rewind(self, step: int, active: bool) -> None:
        """Continue after ``step`` (metrics of later steps are dropped: they are redone;
        events are kept: they tell what happened), on this rank if ``active`` -- a survivor
        that became rank 0 after a shrink takes over."""
        self.close()
        self._bar, self.active = None, active
        if active:
            self._open(step, keep_events=True)

    def records(self) -> list[dict]:
        """The metrics records written so far (rank 0; empty elsewhere)."""
        if not self.active:
            return []
        self._metrics.flush()
        return read_jsonl(self.out / "metrics.jsonl")

    def step(self, record: dict) -> None:
        if not self.active:
            return
        self._metrics.write(json.dumps({"kind": "step", **record}) + "\n")
        step = record["step"]
        if self._bar is not None:
            # one step's rate is noise; show a moving average
            self._rate = record["samples_per_s"] if self._rate is None else \
                0.9 * self._rate + 0.1 * record["samples_per_s"]
            self._bar.set_postfix(loss=fmt(record['loss']),
                                  samples_s=f"{self._rate:.0f}", refresh=False)
            self._bar.update(1)
        elif self._plain:
            # throughput over the whole interval since the last line, not one noisy step
            self._window[0] += record["samples"]
            self._window[1] += record["time_total"]
            if step % self.log_every == 0 or step == self.total:
                rate = self._window[0] / max(self._window[1], 1e-12)
                self._window = [0, 0.0]
                print(f"step {step}/{self.total}  epoch {record['epoch']}  "
                      f"loss {fmt(record['loss'])}  {rate:.0f} samples/s", file=sys.stderr,
                      flush=True)

    def epoch(self, record: dict) -> None:
        if not self.active:
            return
        self._metrics.write(json.dumps({"kind": "epoch", **record}) + "\n")
        line = f"epoch {record['epoch']}  step {record['step']}  loss {fmt(record['loss'])}"
        for key in ("accuracy", "val_loss", "val_accuracy"):
            if record[key] is not None:
                line += f"  {key.replace('accuracy', 'acc')} {fmt(record[key])}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        elif self._plain:
            print(line, file=sys.stderr, flush=True)

    def event(self, event: str, step: int, **fields) -> None:
        if self.active:
            self._events.write(json.dumps({"event": event, "step": step, **fields}) + "\n")

    def note(self, text: str) -> None:
        """A line for the user (rank 0 only), kept apart from the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.active:
            self._metrics.close()
            self._events.close()


END_OF_RUN = "the end-of-run report"  # names the end's collectives when a rank is missing


def report_transport(guard: GuardedComm, stats: dict[str, float], metrics: Metrics,
                     step: int) -> None:
    """Collective (``guard``: the rank's guarded collectives): sum the transport counters
    over ranks; rank 0 records them as a "transport" event and, when faults cost something,
    tells the user what."""
    if not stats:
        return
    keys = sorted(stats)
    totals = guard.sum(np.array([stats[k] for k in keys], dtype=np.float64), END_OF_RUN, step)
    total = dict(zip(keys, totals.tolist()))
    metrics.event("transport", step, **total)
    if total["retransmissions"] or total["lost"] or total["corrupt_detected"]:
        metrics.note(f"transport: {int(total['sent'])} messages, "
                     f"{int(total['retransmissions'])} retransmitted "
                     f"({total['recovery_s']:.3f} s recovering), {int(total['lost'])} lost, "
                     f"{int(total['corrupt_detected'])} corrupt detected, "
                     f"{int(total['stale_discarded'])} duplicates/stale discarded")


def report_fault_outcome(guard: GuardedComm, transport: Any, metrics: Metrics, step: int,
                         delivery: str, warned_steps: set[int]) -> None:
    """Collective (``guard``: the rank's guarded collectives): what every injected message
    fault did (see comm/outcome.py); rank 0 prints one line and records a "fault_outcome"
    event."""
    rows = outcome.gather(guard, transport, END_OF_RUN, step)
    if rows is None:
        return
    classes = outcome.classify(rows, delivery, warned_steps)
    line = outcome.summary(classes, delivery)
    if line is None:
        return
    metrics.event("fault_outcome", step, **{name.replace(" ", "_"): len(effects)
                                            for name, effects in classes.items()})
    metrics.note(line)


class EventLog:
    """A per-rank JSONL log of transport events (injected faults, losses).

    Line-buffered: a rank killed by an injected crash loses nothing it logged.  Called
    with one event dict at a time (the transport's ``events`` callback).
    """

    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a" if append else "w", buffering=1)

    def __call__(self, event: dict) -> None:
        self._fh.write(json.dumps(event) + "\n")

    def close(self) -> None:
        self._fh.close()


def _truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after ``step`` (a resumed run redoes them); keep the rest."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut short when the process was killed mid-write
            continue
    checkpoint.write_text(path, "".join(line + "\n" for line in keep))


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSONL file (for tools and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
