"""A run folder, read once for ``mpitrain report`` and ``mpitrain compare``.

:func:`load_run` reads every file a run may have written (formats: :mod:`mpitrain.metrics`
for ``metrics.jsonl`` / ``events.jsonl`` / ``faults-rank{r}.jsonl``,
:mod:`mpitrain.comm.ledger` for the ledgers, read by :func:`mpitrain.tools.diagnose.read_ledgers`,
and ``traffic.json``).  Any of them may be missing or cut short: a run that failed part way,
an old run from before traffic accounting, ``[sync] ledger = false``.  So nothing here
raises on a missing file; the figure builders say what is absent instead.
"""
from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import MpitrainError
from .diagnose import read_ledgers


class Absent(NamedTuple):
    """A figure that cannot be drawn, and why (one line for the page)."""

    reason: str


@dataclass
class Ledgers:
    """The ranks' collective ledgers, as :func:`~mpitrain.tools.diagnose.read_ledgers` reads
    them: ``by_rank[rank][seq]`` is one collective record."""

    by_rank: dict[int, dict[int, dict]]
    size: int
    errors: list[tuple[int, dict]]


@dataclass
class Run:
    """Everything a run folder holds that the report draws.

    ``steps`` / ``epochs``: the "step" / "epoch" records of metrics.jsonl, in file order;
    ``events``: events.jsonl (rank 0); ``rank_events``: the "fault" and "lost" events of
    every rank's faults-rank{r}.jsonl; ``skipped_lines``: lines that were not JSON (a
    process killed mid-write leaves one).
    """

    path: Path
    config: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    rank_events: list[dict] = field(default_factory=list)
    ledgers: Ledgers | None = None
    traffic: dict | None = None
    finished: bool = False
    skipped_lines: int = 0

    @property
    def name(self) -> str:
        """The job's name (from config.toml's comment line), else the folder's name."""
        return self.config.get("_job") or self.path.name

    @property
    def ranks(self) -> int | None:
        """The job's rank count, from whichever record has it (None if none does)."""
        if self.ledgers is not None:
            return self.ledgers.size
        for event in self.events:
            if event.get("event") == "start" and event.get("ranks"):
                return int(event["ranks"])
        return int(self.traffic["ranks"]) if self.traffic else None

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        """A key of the run's resolved configuration (config.toml), or ``default``."""
        return self.config.get(section, {}).get(key, default)

    def transport(self) -> dict | None:
        """The transport counters summed over ranks (the last "transport" event), if any."""
        found = [e for e in self.events if e.get("event") == "transport"]
        return found[-1] if found else None


def read_records(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSONL file and the number of lines that were not one."""
    records: list[dict] = []
    skipped = 0
    if not path.is_file():
        return records, skipped
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short when the process was killed mid-write
            skipped += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            skipped += 1
    return records, skipped


def _read_config(path: Path) -> dict:
    """config.toml as a dict, with the job's name (from its first comment) as ``_job``."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}
    match = re.match(r"# resolved configuration of job '([^']*)'", text)
    if match:
        config["_job"] = match.group(1)
    return config


def _read_traffic(path: Path) -> dict | None:
    try:
        traffic = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return traffic if isinstance(traffic, dict) and "matrix_bytes" in traffic else None


def load_run(path: str | Path) -> Run:
    """Read the run folder ``path``.

    Raises MpitrainError (exit status 2) when ``path`` is not a folder or holds no
    metrics.jsonl: that is not a run's output folder.
    """
    path = Path(path)
    hint = "give a run's output folder (its [run] out), e.g. runs/digits"
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise MpitrainError(f"{path} {what}", hint=hint)
    if not (path / "metrics.jsonl").is_file():
        raise MpitrainError(f"{path} holds no metrics.jsonl: not a run folder, or the run "
                            f"stopped before it started training", hint=hint)
    run = Run(path, config=_read_config(path / "config.toml"),
              finished=(path / "model.npz").is_file())
    metrics, skipped = read_records(path / "metrics.jsonl")
    run.steps = [r for r in metrics if r.get("kind") == "step" and "step" in r]
    run.epochs = [r for r in metrics if r.get("kind") == "epoch" and "step" in r]
    run.events, more = read_records(path / "events.jsonl")
    skipped += more
    for log in sorted(path.glob("faults-rank*.jsonl")):
        records, more = read_records(log)
        run.rank_events += [r for r in records if r.get("event") in ("fault", "lost")]
        skipped += more
    run.skipped_lines = skipped
    files = sorted(path.glob("ledger-rank*.jsonl"))
    if files:
        by_rank, size, errors = read_ledgers(files)
        run.ledgers = Ledgers(by_rank, size, errors) if by_rank else None
    run.traffic = _read_traffic(path / "traffic.json")
    return run
