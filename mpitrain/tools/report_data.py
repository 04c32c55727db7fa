"""The series each report figure draws, from a run's metrics, events and traffic files.

Every function takes a :class:`~mpitrain.tools.report_run.Run` and returns a dict of plain
lists (JSON-ready: the page embeds it next to its figure, so what is drawn can be checked
against the run's files) or an :class:`~mpitrain.tools.report_run.Absent` saying why the
figure cannot be drawn.  Times are seconds, steps count from 1, as in metrics.jsonl.
The ledger-based series live in :mod:`mpitrain.tools.report_ledger`.
"""
from __future__ import annotations

from collections import Counter

from .report_run import Absent, Run

TRAFFIC_KEYS = ("bytes_sent", "bytes_received", "bytes_retransmitted", "messages_sent",
                "messages_received")


def _column(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records whose ``key`` is a number."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _curves(run: Run, key: str) -> dict:
    """Per-step ``key``, and the epoch records' ``key`` (training) and ``val_{key}``."""
    step, value = _column(run.steps, key)
    epoch_step, epoch_value = _column(run.epochs, key)
    val_step, val_value = _column(run.epochs, f"val_{key}")
    return {"step": step, key: value, "epoch_step": epoch_step,
            f"epoch_{key}": epoch_value, "val_step": val_step, f"val_{key}": val_value}


def loss_series(run: Run) -> dict | Absent:
    """Training loss per step (mean over the global batch) and per epoch; validation loss."""
    curves = _curves(run, "loss")
    if not curves["step"] and not curves["epoch_step"]:
        return Absent("no step records in metrics.jsonl: the run stopped before its first step")
    return curves


def accuracy_series(run: Run) -> dict | Absent:
    """Training accuracy per step and per epoch; validation accuracy (classification only)."""
    curves = _curves(run, "accuracy")
    if not curves["step"] and not curves["epoch_step"] and not curves["val_step"]:
        return Absent("no accuracy in this run (a regression task, or no step records)")
    return curves


def time_split_series(run: Run) -> dict | Absent:
    """Rank 0's step time split: compute, communication calls, waiting; and the total."""
    rows = [r for r in run.steps if all(isinstance(r.get(k), (int, float)) for k in
                                        ("time_compute", "time_comm", "time_wait", "time_total"))]
    if not rows:
        return Absent("no step times in metrics.jsonl")
    return {"step": [r["step"] for r in rows],
            "compute": [r["time_compute"] for r in rows], "comm": [r["time_comm"] for r in rows],
            "wait": [r["time_wait"] for r in rows], "total": [r["time_total"] for r in rows]}


def traffic_step_series(run: Run) -> dict | Absent:
    """Rank 0's payload bytes and messages per step (traffic accounting's step keys)."""
    keys = [k for k in TRAFFIC_KEYS if any(k in r for r in run.steps)]
    if "bytes_sent" not in keys:
        return Absent("no traffic accounting in this run (its step records carry no bytes_sent)")
    rows = [r for r in run.steps if "bytes_sent" in r]
    return {"step": [r["step"] for r in rows], **{k: [r.get(k, 0) for r in rows] for k in keys}}


def matrix_series(run: Run) -> dict | Absent:
    """The whole run's payload bytes between every pair of ranks (traffic.json)."""
    t = run.traffic
    if t is None:
        return Absent("no traffic accounting in this run (no traffic.json in the run folder)")
    return {"ranks": t.get("ranks", len(t["matrix_bytes"])), "algorithm": t.get("algorithm"),
            "modelled": bool(t.get("modelled")), "matrix_bytes": t["matrix_bytes"],
            "matrix_messages": t.get("matrix_messages"),
            "retransmitted_bytes": t.get("retransmitted_bytes")}


def _mark_name(event: dict) -> str:
    return "lost (counted absent)" if event["event"] == "lost" else str(event.get("kind"))


def event_marks(run: Run) -> dict | Absent:
    """What happened to the messages, per step: injected faults by kind, messages counted
    as lost (lossy delivery), replica-check warnings, steps with retransmitted bytes, and
    the step where a synchronization error stopped the run.

    ``kinds[name]`` holds ``step`` and ``count`` (events of that kind at that step, all
    ranks together).  Returns Absent when nothing happened.
    """
    counts: dict[str, Counter] = {}
    for event in run.rank_events:
        if isinstance(event.get("step"), int):
            counts.setdefault(_mark_name(event), Counter())[event["step"]] += 1
    for event in run.events:
        if event.get("event") == "divergence":
            counts.setdefault("divergence warning", Counter())[event["step"]] += 1
    for record in run.steps:
        if record.get("bytes_retransmitted"):
            counts.setdefault("retransmitted", Counter())[record["step"]] += 1
    stuck = _error_step(run)
    if stuck is not None:
        counts.setdefault("sync error", Counter())[stuck] += 1
    if not counts:
        return Absent("no fault, lost message or replica warning recorded in this run "
                      "(faults-rank*.jsonl, events.jsonl)")
    return {"kinds": {name: {"step": sorted(c), "count": [c[s] for s in sorted(c)]}
                      for name, c in sorted(counts.items())}}


def _error_step(run: Run) -> int | None:
    """The step of the first collective a rank entered and never left, when a rank recorded
    a synchronization error in its ledger (where a failed run stopped)."""
    if run.ledgers is None or not run.ledgers.errors:
        return None
    steps = [x["step"] for recs in run.ledgers.by_rank.values() for x in recs.values()
             if x.get("t_leave") is None]
    return min(steps) if steps else None


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def time_totals(run: Run) -> dict:
    """Rank 0's seconds over the whole run: compute, comm, wait, total (0 without steps)."""
    return {k: sum(r.get(f"time_{k}", 0.0) or 0.0 for r in run.steps)
            for k in ("compute", "comm", "wait", "total")}


def summary(run: Run) -> dict:
    """The run in figures: what the terminal summary and the tables show."""
    transport = run.transport() or {}
    faults = Counter(str(e.get("kind")) for e in run.rank_events if e["event"] == "fault")
    lost_events = sum(1 for e in run.rank_events if e["event"] == "lost")
    times = time_totals(run)
    last_epoch = run.epochs[-1] if run.epochs else {}
    return {
        "run": str(run.path), "job": run.name, "ranks": run.ranks,
        "algorithm": run.setting("sync", "algorithm"),
        "delivery": run.setting("faults", "delivery"),
        "steps": len(run.steps), "last_step": run.steps[-1]["step"] if run.steps else 0,
        "finished": run.finished,
        "loss": _last(run.steps, "loss"), "accuracy": _last(run.steps, "accuracy"),
        "epoch": last_epoch.get("epoch"), "val_loss": _last(run.epochs, "val_loss"),
        "val_accuracy": _last(run.epochs, "val_accuracy"),
        "time": times, "steps_per_s": len(run.steps) / times["total"] if times["total"] else None,
        "faults": dict(sorted(faults.items())), "faults_total": sum(faults.values()),
        "retransmissions": _int(transport.get("retransmissions")),
        "lost": _int(transport.get("lost")) if "lost" in transport else lost_events,
        "bytes_sent": _int(transport.get("bytes_sent")),
        "skipped_lines": run.skipped_lines,
    }


def _int(value) -> int | None:
    return None if value is None else int(value)
