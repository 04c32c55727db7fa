"""The report's series that come from the ranks' collective ledgers.

The ledgers (:mod:`mpitrain.comm.ledger`) hold, per rank and collective, its arrival and
departure on rank 0's clock, the seconds blocked on messages, the bytes and a checksum of
the result.  Lined up with :mod:`mpitrain.tools.diagnose` (the same reading, the same
straggler attribution), they give what no single rank's metrics can: where every rank's
time went, how much communication hid behind computation, each layer's allreduce, and
whether the replicas drifted apart.  Conventions as in :mod:`mpitrain.tools.report_data`.
"""
from __future__ import annotations

import re
from collections import Counter

from .diagnose import collect_arrivals, stragglers, union_length, waiting_per_rank
from .report_run import Absent, Ledgers, Run

NO_LEDGER = "no collective ledgers in this run (ledger-rank*.jsonl; [sync] ledger = false?)"


def _done(ledgers: Ledgers, rank: int) -> list[dict]:
    """Rank ``rank``'s collectives that completed, in order."""
    recs = ledgers.by_rank.get(rank, {})
    return [recs[s] for s in sorted(recs) if recs[s].get("t_leave") is not None]


def rank_time_split(run: Run) -> dict | Absent:
    """Each rank's time from its first collective to its last, split three ways.

    ``wait``: waiting at collectives for the last rank to arrive (diagnose's attribution);
    ``comm``: the rest of the time some collective of the rank was in flight;
    ``compute``: no collective in flight (forward, backward, optimizer, data).
    Seconds per rank; ``span`` is their sum.
    """
    ledgers = run.ledgers
    if ledgers is None:
        return Absent(NO_LEDGER)
    waited = waiting_per_rank(collect_arrivals(ledgers.by_rank))
    out: dict[str, list] = {"rank": [], "compute": [], "comm": [], "wait": [], "span": []}
    for rank in sorted(ledgers.by_rank):
        done = _done(ledgers, rank)
        if not done:
            continue
        span = max(x["t_leave"] for x in done) - min(x["t_enter"] for x in done)
        in_flight = union_length([(x["t_enter"], x["t_leave"]) for x in done])
        wait = min(waited.get(rank, 0.0), in_flight)
        for key, value in (("rank", rank), ("compute", span - in_flight),
                           ("comm", in_flight - wait), ("wait", wait), ("span", span)):
            out[key].append(value)
    return out if out["rank"] else Absent("no collective completed on any rank")


def overlap_series(run: Run) -> dict | Absent:
    """Rank 0's communication-computation overlap, per step.

    ``window``: the time some gradient allreduce of the step was in flight (union of rank 0's
    collectives, entry to exit, from its ledger); ``exposed``: the time rank 0 did not
    compute because of communication (metrics' time_comm + time_wait); ``overlap``: the share
    of the window rank 0 spent computing, max(0, window - exposed) / window (0..1).
    ``total`` is the same over the whole run (sums of windows and of hidden time).
    """
    if run.ledgers is None:
        return Absent(NO_LEDGER)
    windows: dict[int, list[tuple[float, float]]] = {}
    for x in _done(run.ledgers, 0):
        windows.setdefault(x["step"], []).append((x["t_enter"], x["t_leave"]))
    by_step = {r["step"]: r for r in run.steps}
    out: dict[str, list] = {"step": [], "window": [], "exposed": [], "overlap": []}
    for step in sorted(set(windows) & set(by_step)):
        window = union_length(windows[step])
        exposed = (by_step[step].get("time_comm") or 0.0) + (by_step[step].get("time_wait") or 0.0)
        if window <= 0:
            continue
        for key, value in (("step", step), ("window", window), ("exposed", exposed),
                           ("overlap", max(0.0, window - exposed) / window)):
            out[key].append(value)
    if not out["step"]:
        return Absent("no step has both rank 0's ledger and its step times")
    hidden = sum(max(0.0, w - e) for w, e in zip(out["window"], out["exposed"]))
    out["total"] = hidden / sum(out["window"])
    return out


def layer_series(run: Run) -> dict | Absent:
    """Per layer (a fused bucket is named by its lowest layer, as in the ledger): the mean
    and longest time of its allreduce over all ranks and steps, the mean time blocked on
    messages inside it, its gradient bytes, and (with traffic accounting) the payload bytes
    and messages it put on the network over the whole run."""
    if run.ledgers is None:
        return Absent(NO_LEDGER)
    by_layer: dict[int, list[dict]] = {}
    for rank in run.ledgers.by_rank:
        for x in _done(run.ledgers, rank):
            by_layer.setdefault(x["layer"], []).append(x)
    if not by_layer:
        return Absent("no collective completed on any rank")
    layers = sorted(by_layer)
    durations = {i: [x["t_leave"] - x["t_enter"] for x in by_layer[i]] for i in layers}
    out = {"layer": layers,
           "time_mean": [sum(durations[i]) / len(durations[i]) for i in layers],
           "time_max": [max(durations[i]) for i in layers],
           "wait_mean": [sum(x.get("wait_s") or 0.0 for x in by_layer[i]) / len(by_layer[i])
                         for i in layers],
           "bytes": [Counter(x["bytes"] for x in by_layer[i]).most_common(1)[0][0]
                     for i in layers],
           "collectives": [len(by_layer[i]) for i in layers]}
    per_layer = (run.traffic or {}).get("per_layer")
    if per_layer:
        out["wire_bytes"] = [per_layer.get(str(i), {}).get("bytes", 0) for i in layers]
        out["wire_messages"] = [per_layer.get(str(i), {}).get("messages", 0) for i in layers]
    return out


def straggler_series(run: Run) -> dict | Absent:
    """Per rank, over the collectives every rank entered and left: how often it arrived
    last, how late on average when it did, how long the others were blocked on messages
    from it beyond its own waiting, and how long it waited for the last arrival; and
    diagnose's verdict (``text``, its lines)."""
    ledgers = run.ledgers
    if ledgers is None:
        return Absent(NO_LEDGER)
    if ledgers.size < 2:
        return Absent("one rank: nobody to wait for")
    seen = collect_arrivals(ledgers.by_rank)
    if not seen.n:
        return Absent("no collective that every rank entered and left")
    waited = waiting_per_rank(seen)
    ranks = sorted(ledgers.by_rank)
    return {"rank": ranks, "collectives": seen.n,
            "last_count": [seen.last_count.get(r, 0) for r in ranks],
            "late_mean": [seen.late_s[r] / seen.last_count[r] if seen.last_count.get(r) else 0.0
                          for r in ranks],
            "blocked_on": [seen.blame.get(r, 0.0) for r in ranks],
            "waited": [waited.get(r, 0.0) for r in ranks],
            "text": stragglers(ledgers.by_rank, ledgers.size)}


def _replica_groups(ledgers: Ledgers) -> tuple[list[int], dict[int, list[int]], list[dict]]:
    """Per layer and step, how many different replicas of the layer the ranks hold.

    Two ranks hold the same parameters after a step iff they held the same before and got
    the same reduced gradient (the update is deterministic), so the ranks' partition is
    refined by each step's result checksums.  Returns (steps, layer -> groups per step,
    the (step, layer) points where the results differed, with the ranks grouped).
    """
    results: dict[tuple[int, int], dict[int, int]] = {}
    for rank in ledgers.by_rank:
        for x in _done(ledgers, rank):
            results.setdefault((x["step"], x["layer"]), {})[rank] = x["checksum"]
    steps = sorted({s for s, _ in results})
    layers = sorted({i for _, i in results})
    groups: dict[int, list[int]] = {i: [] for i in layers}
    mismatches = []
    for layer in layers:
        partition = [sorted(ledgers.by_rank)]
        for step in steps:
            sums = results.get((step, layer), {})
            if len(set(sums.values())) > 1:
                by_sum: dict[int, list[int]] = {}
                for rank, value in sorted(sums.items()):
                    by_sum.setdefault(value, []).append(rank)
                mismatches.append({"step": step, "layer": layer, "ranks": list(by_sum.values())})
            partition = [part for group in partition for part in _split(group, sums)]
            groups[layer].append(len(partition))
    return steps, groups, mismatches


def _split(group: list[int], sums: dict[int, int]) -> list[list[int]]:
    """``group`` split by the checksums in ``sums`` (ranks without one stay together)."""
    parts: dict = {}
    for rank in group:
        parts.setdefault(sums.get(rank), []).append(rank)
    return list(parts.values())


def divergence_series(run: Run) -> dict | Absent:
    """The replicas drifting apart: per layer and step, the number of different replicas
    (1: all ranks agree; see :func:`_replica_groups`), the messages counted as lost, and the
    replica / end-to-end check warnings (events.jsonl) with the layer they name."""
    lost = [{"step": e["step"], "layer": e.get("layer"), "rank": e.get("rank")}
            for e in run.rank_events if e["event"] == "lost"]
    checks = []
    for event in run.events:
        if event.get("event") == "divergence":
            layer = re.search(r"layer (\d+)", event.get("message", ""))
            checks.append({"step": event["step"], "layer": int(layer.group(1)) if layer else None,
                           "message": event.get("message", "")})
    out: dict = {"ranks": run.ranks, "lost": lost, "checks": checks}
    if run.ledgers is not None:
        out["step"], groups, out["mismatches"] = _replica_groups(run.ledgers)
        out["groups"] = {str(layer): counts for layer, counts in groups.items()}
    if out.get("mismatches") or lost or checks:
        return out
    if run.ledgers is None:
        return Absent(f"{NO_LEDGER}; no message was lost and no check warned")
    if run.setting("faults", "delivery") != "lossy":
        return Absent("no replica divergence: every collective gave the same result on every "
                      "rank (ledger checksums), and no message was lost")
    return out
