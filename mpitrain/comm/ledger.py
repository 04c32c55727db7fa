"""Per-rank collective ledger (JSONL), the input of ``mpitrain diagnose``.

File: ``<run_dir>/ledger-rank{r}.jsonl`` (:func:`ledger_path`), one JSON object
per line:

* first line, ``{"type": "header", "rank", "size", "clock_offset_s", "t_open"}``.
  ``clock_offset_s`` is added to this rank's ``time.time()`` to get rank 0's
  clock (estimated by ping-pong at open; 0 on rank 0); every time in the file
  is already corrected, so ranks can be compared directly.
* per collective, ``{"type": "collective", "seq", "step", "layer",
  "algorithm", "bytes", "checksum", "t_enter", "t_leave", "wait_s",
  "waited_on"}``: ``seq`` counts this rank's collectives from 0; ``checksum``
  is the CRC-32 of the reduced buffer (equal on every rank when the replicas
  agree); ``t_enter`` is the arrival time of this rank at the collective;
  ``wait_s`` the time it spent blocked on messages, mostly on ``waited_on``.
  A collective entered but not left when the ledger was flushed on an error
  has ``t_leave: null`` and ``"open": true``.
* ``{"type": "error", "message", "t"}`` when a SyncError was raised.

Records are buffered in memory and written in the order of the collectives' identity
(``seq``, the same on every rank), not in the order they completed (an MPI may complete
layer 0 before layer 1): when a step's last collective completes with none still open,
when a new step begins, on :meth:`Ledger.flush` (the transport calls it with the error
before raising; a "crash" fault calls it before exiting) and on :meth:`Ledger.close`
(the synchronizer's close, on every way out of a run).  So the per-collective cost is a
dict and a list append, and a rank that dies abruptly loses at most its current step.

Bounded like a flight recorder: past :data:`MAX_BYTES`, the file is rotated to
``ledger-rank{r}.jsonl.1`` (one older generation kept) and a new one begins with its own
header, so a rank's ledger never holds more than twice that, however long the run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from mpitrain.comm.tags import TAG_CLOCK_PING, TAG_CLOCK_PONG


MAX_BYTES = 32 << 20  # one generation of a rank's ledger


def ledger_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / f"ledger-rank{rank}.jsonl"


def measure_clock_offset(comm, rounds: int = 5) -> float:
    """Offset to add to this rank's time.time() to read rank 0's clock (collective).

    Cristian's method: the reply with the smallest round trip wins.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    buf = np.zeros(1, np.float64)
    best = (float("inf"), 0.0)
    for peer in range(1, size):
        for _ in range(rounds):
            if rank == 0:
                comm.Recv(buf, peer, TAG_CLOCK_PING)
                buf[0] = time.time()
                comm.Send(buf, peer, TAG_CLOCK_PONG)
            elif rank == peer:
                t1 = time.time()
                comm.Send(buf, 0, TAG_CLOCK_PING)
                comm.Recv(buf, 0, TAG_CLOCK_PONG)
                t2 = time.time()
                best = min(best, (t2 - t1, float(buf[0]) - (t1 + t2) / 2))
    return 0.0 if rank == 0 else best[1]


class Ledger:
    """Appends collective records for one rank.  Create it collectively if ``comm`` is given."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, size: int, comm=None,
                 max_bytes: int = MAX_BYTES):
        self.rank, self.size, self.max_bytes = rank, size, max_bytes
        self.offset = measure_clock_offset(comm) if comm is not None and size > 1 else 0.0
        self.path = ledger_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._buf: list[dict] = []
        self._open: dict[int, dict] = {}
        self._seq = 0
        self._step: int | None = None
        self._start_file()

    def _start_file(self) -> None:
        self._fh = open(self.path, "w", encoding="utf-8")
        self._bytes = 0
        self._write({"type": "header", "rank": self.rank, "size": self.size,
                     "clock_offset_s": self.offset, "t_open": time.time() + self.offset})
        self._fh.flush()

    def _write(self, rec: dict) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        self._fh.write(line)
        self._bytes += len(line)

    def enter(self, step: int, layer: int, algorithm: str, nbytes: int) -> dict:
        """Record the arrival of this rank at a collective; returns the open record."""
        if step != self._step:
            self.flush()
            self._step = step
        rec = {"type": "collective", "seq": self._seq, "step": step, "layer": layer,
               "algorithm": algorithm, "bytes": nbytes, "checksum": None,
               "t_enter": time.time() + self.offset, "t_leave": None}
        self._open[self._seq] = rec
        self._seq += 1
        return rec

    def leave(self, rec: dict, checksum: int, wait_s: float = 0.0, waited_on: int | None = None) -> None:
        """Complete ``rec``: result checksum, leave time, time spent waiting and on whom."""
        rec["t_leave"] = time.time() + self.offset
        rec["checksum"] = checksum
        rec["wait_s"] = round(wait_s, 6)
        rec["waited_on"] = waited_on
        self._open.pop(rec["seq"], None)
        self._buf.append(rec)
        if rec["layer"] == 0 and not self._open:  # layers sync last first: layer 0 ends a step
            self.flush()

    def flush(self, error: str | None = None) -> None:
        """Write buffered records; with ``error``, also the open ones and an error record."""
        if self._fh.closed:
            return
        for rec in sorted(self._buf, key=lambda r: r["seq"]):
            self._write(rec)
        self._buf.clear()
        if error is not None:
            for rec in self._open.values():
                self._write({**rec, "open": True})
            self._open.clear()
            self._write({"type": "error", "message": error, "t": time.time() + self.offset})
        self._fh.flush()
        if self._bytes > self.max_bytes and error is None:
            self._fh.close()
            self.path.replace(self.path.with_name(self.path.name + ".1"))
            self._start_file()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()
