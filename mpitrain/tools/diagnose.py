"""``mpitrain diagnose RUN_DIR``: line up the ranks' collective ledgers.

Reads ``RUN_DIR/ledger-rank{r}.jsonl`` (format: :mod:`mpitrain.comm.ledger`)
and answers the question every hung or failed job asks: *which collective did
the ranks stop agreeing on, and who is missing?*  Then it attributes waiting
time to stragglers.

``diagnose(run_dir) -> (report_text, exit_code)``; exit codes:
    0  the ledgers agree (the report may still name a straggler)
    1  a disagreement: a rank missing from a collective the others entered,
       a collective entered but never left, different collectives at the same
       sequence number, different result checksums, or a recorded error
    2  no readable ledger in RUN_DIR
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..comm.checks import ranks_text


def _load(path: Path) -> tuple[dict, list[dict], list[dict]]:
    """A rank's ledger: its older generation (``.1``, see comm/ledger.py) and the current."""
    header, colls, errors = {}, [], []
    older = path.with_name(path.name + ".1")
    text = (older.read_text(encoding="utf-8") if older.exists() else "") + \
        path.read_text(encoding="utf-8")
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        kind = rec.get("type")
        if kind == "header":
            header = rec
        elif kind == "collective":
            colls.append(rec)
        elif kind == "error":
            errors.append(rec)
    return header, colls, errors


def read_ledgers(files: list[Path]) -> tuple[dict[int, dict[int, dict]], int, list[tuple[int, dict]]]:
    """The ledgers in ``files``: (rank -> seq -> collective record, the job's rank count,
    (rank, error record) pairs).  Files without a header line are left out."""
    by_rank: dict[int, dict[int, dict]] = {}
    errors: list[tuple[int, dict]] = []
    size = 0
    for f in files:
        header, colls, errs = _load(f)
        if not header:
            continue
        r = int(header["rank"])
        size = max(size, int(header["size"]))
        by_rank[r] = {c["seq"]: c for c in colls}
        errors += [(r, e) for e in errs]
    # rotated ledgers keep the newest collectives: compare only what every rank still has
    start = max((min(c) for c in by_rank.values() if c), default=0)
    by_rank = {r: {s: c for s, c in colls.items() if s >= start} for r, colls in by_rank.items()}
    return by_rank, size, errors


def _name(rec: dict) -> str:
    return f"#{rec['seq']} (step {rec['step']}, layer {rec['layer']}, {rec['algorithm']}, {rec['bytes']} bytes)"


def _ranks(rs) -> str:
    return ranks_text(sorted(rs))


def first_disagreement(by_rank: dict[int, dict[int, dict]], size: int) -> str | None:
    """The first collective (by sequence number) the ranks do not agree on, described."""
    last = max((max(c) for c in by_rank.values() if c), default=-1)
    for seq in range(last + 1):
        recs = {r: by_rank.get(r, {}).get(seq) for r in range(size)}
        present = {r: x for r, x in recs.items() if x is not None}
        missing = [r for r, x in recs.items() if x is None]
        if not present:  # a gap left by lines cut short
            continue
        ref = next(iter(present.values()))
        if missing:
            lines = [f"first disagreement at collective {_name(ref)}: {_ranks(missing)} never "
                     f"entered it, {_ranks(present)} did."]
            for r in missing:
                done = by_rank.get(r, {})
                if done:
                    lines.append(f"  rank {r}: last collective {_name(done[max(done)])}")
                else:
                    lines.append(f"  rank {r}: no collective recorded")
            return "\n".join(lines)
        shapes = Counter((x["step"], x["layer"], x["algorithm"], x["bytes"]) for x in present.values())
        if len(shapes) > 1:
            detail = "; ".join(f"{_ranks([r for r, x in present.items() if (x['step'], x['layer'], x['algorithm'], x['bytes']) == k])}: "
                               f"step {k[0]}, layer {k[1]}, {k[2]}, {k[3]} bytes" for k in shapes)
            return f"ranks run different collectives at #{seq}: {detail}"
        opened = [r for r, x in present.items() if x.get("t_leave") is None]
        if opened:
            return (f"{_ranks(opened)} entered collective {_name(ref)} and never left it "
                    f"(stuck or failed inside).")
        sums = Counter(x["checksum"] for x in present.values())
        if len(sums) > 1:
            groups = [sorted(r for r, x in present.items() if x["checksum"] == c) for c in sums]
            return (f"results differ at collective {_name(ref)}: "
                    + " vs ".join(_ranks(g) for g in groups) + " (the replicas diverge here)")
    return None


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The time covered by ``intervals`` (from, until), overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@dataclass
class Arrivals:
    """Who arrived when at the collectives that every rank entered and left."""

    n: int = 0                                                 # collectives counted
    last_count: Counter[int] = field(default_factory=Counter)  # rank -> times it came last
    late_s: dict[int, float] = field(default_factory=lambda: defaultdict(float))  # seconds late
    waits: dict = field(default_factory=dict)  # (step, rank) -> [(from, until)] waiting for the last
    blame: dict[int, float] = field(default_factory=lambda: defaultdict(float))  # peer -> seconds ranks were blocked on it
    steps: dict = field(default_factory=dict)  # step -> [first arrival, last departure]

    def add(self, recs: dict[int, dict]) -> None:
        """Count one collective: its ledger record of every rank."""
        self.n += 1
        for x in recs.values():
            peer = x.get("waited_on")
            if peer is not None and peer in recs:
                # waits cascade (in a ring everyone waits on its left neighbour): blame a
                # peer only for the part of the wait it did not spend waiting itself
                self.blame[peer] += max(0.0, (x.get("wait_s") or 0.0) - (recs[peer].get("wait_s") or 0.0))
        arrivals: dict[int, float] = {r: x["t_enter"] for r, x in recs.items()}
        slow = max(arrivals, key=lambda r: arrivals[r])
        t_last = arrivals[slow]
        self.last_count[slow] += 1
        self.late_s[slow] += t_last - min(arrivals.values())
        step = next(iter(recs.values()))["step"]
        for r, t in arrivals.items():  # rank r waits from its arrival until the last one's
            if r != slow:
                self.waits.setdefault((step, r), []).append((t, t_last))
        span = self.steps.setdefault(step, [float("inf"), float("-inf")])
        span[0] = min(span[0], min(arrivals.values()))
        span[1] = max(span[1], max(x["t_leave"] for x in recs.values()))


def collect_arrivals(by_rank: dict[int, dict[int, dict]]) -> Arrivals:
    """The arrivals at every collective that all ranks in ``by_rank`` entered and left."""
    common = set.intersection(*(set(c) for c in by_rank.values())) if by_rank else set()
    seen = Arrivals()
    for seq in sorted(common):
        recs = {r: by_rank[r][seq] for r in by_rank}
        if all(x.get("t_leave") is not None for x in recs.values()):
            seen.add(recs)
    return seen


def waiting_per_rank(seen: Arrivals) -> dict[int, float]:
    """Seconds each rank waited at collectives for the last rank to arrive.

    Waits for overlapping collectives (non-blocking native allreduces) overlap in time:
    each rank's waiting time counts once, as the union of its intervals, per step.
    """
    per_rank: dict[int, float] = {}
    for (_, r), intervals in seen.waits.items():
        per_rank[r] = per_rank.get(r, 0.0) + union_length(intervals)
    return per_rank


def stragglers(by_rank: dict[int, dict[int, dict]], size: int) -> list[str]:
    """Per collective, who arrived last and how long the others waited for it."""
    seen = collect_arrivals(by_rank)
    n = seen.n
    if not n or size < 2:
        return []
    per_rank = waiting_per_rank(seen)
    wait_total = sum(per_rank.values()) / max(len(per_rank), 1)
    # wall time from the first arrival to the last departure: whole steps, compute included
    step_time = max(b for _, b in seen.steps.values()) - min(a for a, _ in seen.steps.values())
    rank, times = seen.last_count.most_common(1)[0]
    frac = wait_total / step_time if step_time > 0 else 0.0
    lines = [f"arrival order over {n} collectives: "
             + ", ".join(f"rank {r} last {c}x" for r, c in sorted(seen.last_count.items()))]
    mean_late = seen.late_s[rank] / times
    # Scheduling jitter makes someone last every time; name a straggler only
    # when it is late by more than jitter and the waiting matters.
    if times > n / 2 and frac > 0.2 and mean_late > 2e-3:
        lines.insert(0, f"straggler: rank {rank} arrived last at {times} of {n} collectives, on "
                        f"average {1e3 * mean_late:.1f} ms after the first rank; the "
                        f"other ranks spent {100 * frac:.0f}% of the step time waiting at collectives.")
    else:
        lines.insert(0, f"no clear straggler (ranks waited {100 * frac:.0f}% of the step time).")
    if seen.blame:
        peer, secs = max(seen.blame.items(), key=lambda kv: kv[1])
        share = secs / sum(seen.blame.values()) if sum(seen.blame.values()) else 0.0
        # the same noise guard: a real culprit holds others up for a fifth of the steps
        if share > 0.5 and step_time > 0 and secs / step_time > 0.2:
            lines.insert(1, f"most time blocked inside collectives was spent waiting for messages "
                            f"from rank {peer}: {secs:.3f} s not explained by its own waiting "
                            f"({100 * share:.0f}% of such waiting): a slow sender or a slow link from it.")
    return lines


def diagnose(run_dir: str | Path) -> tuple[str, int]:
    """Report on the ledgers in ``run_dir``: (text, exit code as in the module docstring)."""
    files = sorted(Path(run_dir).glob("ledger-rank*.jsonl"))
    if not files:
        return f"no ledger files (ledger-rank*.jsonl) in {run_dir}", 2
    by_rank, size, errors = read_ledgers(files)
    if not by_rank:
        return f"no readable ledger in {run_dir}", 2
    lines = [f"{len(by_rank)} of {size} ranks wrote a ledger; "
             f"{max(len(c) for c in by_rank.values())} collectives at most."]
    code = 0
    absent = [r for r in range(size) if r not in by_rank]
    if absent:
        lines.append(f"{_ranks(absent)} wrote no ledger (never started, or died before writing).")
        code = 1
    first = first_disagreement(by_rank, size) if len(by_rank) > 1 or size == 1 else None
    if first:
        lines.append(first)
        code = 1
    elif not absent:
        lines.append("all ranks ran the same collectives with identical results.")
    for r, e in errors[:1]:
        lines.append(f"error recorded by rank {r}: {e.get('message')}")
        code = 1
    lines += stragglers(by_rank, size)
    return "\n".join(lines), code
