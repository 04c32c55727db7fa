"""trace.json: the timeline of chosen steps (:mod:`mpitrain.trace`) as a file, all ranks merged.

The file is the JSON object format of the Trace Event Format (what https://ui.perfetto.dev
and chrome://tracing open): ``{"traceEvents": [...], "displayTimeUnit": "ms",
"metadata": {...}}``, one event per line, sorted by rank, track and time (a span before the
spans it contains).  ``metadata`` says what was traced: job, ranks, steps, algorithm,
delivery, ``clock_origin_unix_s`` (rank 0's clock at time 0), ``clock_offsets_s`` (what
was added to each rank's clock) and ``missing_ranks`` (ranks whose part never came).

Two ways to it, both ending in :func:`write`:

* a run that ends normally: every rank hands its events to rank 0 (a gather, after the
  run's other end-of-run collectives) and rank 0 writes the file;
* a run that fails (or is stopped) after its window began: a gather could wait forever on a
  dead rank, so every rank writes its own part, ``trace-rank{r}.json`` (a trace file of that
  rank alone), and rank 0 waits at most :data:`PART_WAIT_S` for the parts -- the ranks raise
  the same error within the transport's grace period -- then merges those it finds
  (:func:`merge`) and removes them.  A part written too late for that (or when rank 0 died)
  stays, and ``merge(RUN_DIR)`` combines the parts later.

Writing is best effort on the failure path: the run's own error is what the user must see.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from mpitrain.checkpoint import write_text

TRACE_FILE = "trace.json"
PART_GLOB = "trace-rank*.json"
PART_WAIT_S = 2.0  # rank 0's wait for the other ranks' parts after a failure


def part_path(out: Path, rank: int) -> Path:
    return Path(out) / f"trace-rank{rank}.json"


def document(events: list[dict], metadata: dict[str, Any]) -> dict[str, Any]:
    """A trace file's content."""
    return {"traceEvents": events, "displayTimeUnit": "ms", "metadata": metadata}


def names(rank: int, tracks: dict[int, str]) -> list[dict]:
    """Metadata events naming rank ``rank``'s process ("rank r") and its ``tracks`` (tid ->
    name), shown in the order of their tids."""
    def meta(kind: str, tid: int, key: str, value: Any) -> dict:
        return {"ph": "M", "name": kind, "pid": rank, "tid": tid, "args": {key: value}}
    events = [meta("process_name", 0, "name", f"rank {rank}"),
              meta("process_sort_index", 0, "sort_index", rank)]
    for tid in sorted(tracks):
        events += [meta("thread_name", tid, "name", tracks[tid]),
                   meta("thread_sort_index", tid, "sort_index", tid)]
    return events


def _order(event: dict) -> tuple:
    """Per rank: metadata first, then per track by time, a span before those it contains."""
    return (event["pid"], event["ph"] != "M", event.get("tid", 0), event.get("ts", 0.0),
            -event.get("dur", 0.0))


def combine(parts: list[dict]) -> dict[str, Any]:
    """One trace of the ranks' ``parts`` (each a :func:`document` whose metadata has the
    rank's ``rank`` and ``clock_offset_s`` besides the job's)."""
    meta = {k: v for k, v in parts[0]["metadata"].items() if k not in ("rank", "clock_offset_s")}
    offsets = {p["metadata"]["rank"]: p["metadata"]["clock_offset_s"] for p in parts}
    ranks = int(meta.get("ranks", max(offsets) + 1))
    meta["clock_offsets_s"] = [offsets.get(r) for r in range(ranks)]
    meta["missing_ranks"] = [r for r in range(ranks) if r not in offsets]
    events = sorted((e for p in parts for e in p["traceEvents"]), key=_order)
    return document(events, meta)


def dumps(doc: dict[str, Any]) -> str:
    """The trace as JSON text, one event per line."""
    events = ",\n".join(json.dumps(e, separators=(",", ":"), default=str)
                        for e in doc["traceEvents"])
    return (f'{{"traceEvents": [\n{events}\n],\n'
            f'"displayTimeUnit": {json.dumps(doc["displayTimeUnit"])},\n'
            f'"metadata": {json.dumps(doc["metadata"], default=str)}}}\n')


def write(out: Path, parts: Sequence[dict | None]) -> Path | None:
    """Write ``out/trace.json`` of ``parts`` (None: a rank that traced nothing) atomically,
    and remove the part files left in ``out``; None, writing nothing, when no rank traced."""
    traced = [p for p in parts if p is not None]
    if not traced:
        return None
    path = Path(out) / TRACE_FILE
    write_text(path, dumps(combine(traced)))
    for part in Path(out).glob(PART_GLOB):
        part.unlink(missing_ok=True)
    return path


def write_part(out: Path, rank: int, doc: dict[str, Any]) -> None:
    """Best effort: this rank's part after a failure."""
    try:
        write_text(part_path(out, rank), dumps(doc))
    except OSError:
        pass


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # gone meanwhile, or not a part
        return None


def merge(out: Path, ranks: int | None = None, wait_s: float = 0.0) -> Path | None:
    """Merge the parts ``trace-rank{r}.json`` in ``out`` into ``out/trace.json`` and remove
    them, first waiting at most ``wait_s`` until all ``ranks`` parts are there.  Returns the
    trace's path, or None if there was no part (or it could not be written)."""
    out = Path(out)
    deadline = time.monotonic() + wait_s
    while ranks is not None and len(list(out.glob(PART_GLOB))) < ranks \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    parts = [doc for doc in map(_read, sorted(out.glob(PART_GLOB))) if doc is not None]
    try:
        return write(out, parts)
    except OSError:
        return None
