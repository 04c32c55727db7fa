"""Traffic accounting: what the gradient synchronization of one rank put on the network.

Always on, and cheap: a few integer additions per message, no allocation.  Counted at the
transport (the one place every point-to-point message passes), for the gradient payloads
only -- headers, acknowledgements, fences and error reports are the transport's overhead,
not the training's traffic:

* per step (:meth:`Traffic.take_step`, written into each step record of metrics.jsonl):
  ``bytes_sent`` / ``messages_sent`` (first transmissions, also when a fault then drops or
  delays them), ``bytes_received`` / ``messages_received`` (accepted payloads),
  ``bytes_retransmitted`` (reliable delivery's resends, apart);
* per link (source -> destination rank) and per layer, for the whole run
  (:meth:`Traffic.table`, merged over ranks into ``traffic.json`` by :func:`gather`), with
  retransmissions, duplicates, drops and corruptions counted apart.

Native MPI's allreduce cannot be seen message by message: it is accounted by its
algorithm's volume (:func:`mpitrain.comm.volume.bytes_sent`) and marked as modelled; the
per-link matrix then stays empty.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mpitrain.comm.volume import bytes_sent as modelled_bytes

if TYPE_CHECKING:  # not at run time: it imports mpi4py.MPI, and tools read traffic unlaunched
    from mpitrain.comm.guarded import GuardedComm

STEP_KEYS = ("bytes_sent", "bytes_received", "bytes_retransmitted", "messages_sent",
             "messages_received")
LINK_KINDS = ("bytes", "messages", "retransmitted_bytes", "duplicated", "dropped", "corrupted")
MATRIX_KEYS = {"bytes": "matrix_bytes", "messages": "matrix_messages",  # names in traffic.json
               "retransmitted_bytes": "retransmitted_bytes", "duplicated": "matrix_duplicated",
               "dropped": "matrix_dropped", "corrupted": "matrix_corrupted"}


class Traffic:
    """One rank's counters (``rank`` of ``size``); ``modelled``: native MPI (see module)."""

    def __init__(self, rank: int, size: int, modelled: bool = False):
        self.rank, self.size, self.modelled = rank, size, modelled
        self.step = dict.fromkeys(STEP_KEYS, 0)
        self.links = {kind: np.zeros(size, np.int64) for kind in LINK_KINDS}  # to each dst
        self.layers: dict[int, list[int]] = {}  # layer -> [bytes sent, messages sent]

    # ---- the transport's hooks (measured)
    def sent(self, dst: int, layer: int, nbytes: int) -> None:
        """A payload's first transmission to ``dst`` (fences and empty messages excluded)."""
        step = self.step
        step["bytes_sent"] += nbytes
        step["messages_sent"] += 1
        self.links["bytes"][dst] += nbytes
        self.links["messages"][dst] += 1
        per_layer = self.layers.get(layer)
        if per_layer is None:
            per_layer = self.layers[layer] = [0, 0]
        per_layer[0] += nbytes
        per_layer[1] += 1

    def received(self, nbytes: int) -> None:
        self.step["bytes_received"] += nbytes
        self.step["messages_received"] += 1

    def retransmitted(self, dst: int, nbytes: int) -> None:
        self.step["bytes_retransmitted"] += nbytes
        self.links["retransmitted_bytes"][dst] += nbytes

    def faulted(self, dst: int, kind: str) -> None:
        """An injected fault hit a message to ``dst``: "duplicate", "drop" or "corrupt"."""
        key = {"duplicate": "duplicated", "drop": "dropped", "corrupt": "corrupted"}.get(kind)
        if key is not None:
            self.links[key][dst] += 1

    # ---- native MPI (modelled)
    def allreduce(self, layer: int, nbytes: int, algorithm: str = "native") -> None:
        """A native allreduce of ``nbytes``: count what its algorithm sends and receives
        (the same amount in an allreduce) per rank."""
        volume = int(round(modelled_bytes(algorithm, self.size, nbytes)))
        for key in ("bytes_sent", "bytes_received"):
            self.step[key] += volume
        per_layer = self.layers.setdefault(layer, [0, 0])
        per_layer[0] += volume

    # ---- reading
    def take_step(self) -> dict[str, Any]:
        """This step's counters (then zeroed), for the step's metrics record."""
        out: dict[str, Any] = dict(self.step)
        out["traffic"] = "modelled" if self.modelled else "measured"
        for key in STEP_KEYS:
            self.step[key] = 0
        return out

    def table(self) -> dict[str, Any]:
        """The whole run's per-destination and per-layer counters of this rank."""
        return {"rank": self.rank, "links": {k: v.tolist() for k, v in self.links.items()},
                "layers": {str(k): v for k, v in sorted(self.layers.items())}}


def gather(guard: GuardedComm, traffic: Traffic, algorithm: str, step: int
           ) -> dict[str, Any] | None:
    """Collective: every rank's table merged on rank 0 (None elsewhere), as traffic.json
    holds it: ``matrix_<kind>`` is P x P (row: source rank, column: destination).
    ``guard``: the guarded collectives; ``step`` (the run's last) names this one, "the
    traffic report", in the error if a rank does not arrive."""
    tables = guard.gather(traffic.table(), "the traffic report", step)
    if tables is None:
        return None
    size = len(tables)
    merged: dict[str, Any] = {"ranks": size, "algorithm": algorithm,
                              "modelled": traffic.modelled}
    rows = sorted(tables, key=lambda t: t["rank"])
    for kind, key in MATRIX_KEYS.items():
        merged[key] = [t["links"][kind] for t in rows]
    layers: dict[str, dict[str, int]] = {}
    for t in tables:
        for layer, (nbytes, messages) in t["layers"].items():
            entry = layers.setdefault(layer, {"bytes": 0, "messages": 0})
            entry["bytes"] += nbytes
            entry["messages"] += messages
    merged["per_layer"] = dict(sorted(layers.items(), key=lambda kv: int(kv[0])))
    return merged

