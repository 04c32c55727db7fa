"""The collective ledger writes records in the collectives' order, whatever order they
complete in (an MPI may complete layer 0 before layer 1: Open MPI does)."""
from __future__ import annotations

import json

from mpitrain.comm.ledger import Ledger


def collectives(path) -> list[tuple[int, int]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["layer"]) for r in records if r["type"] == "collective"]


def test_records_follow_the_collectives_order_not_their_completion(tmp_path):
    ledger = Ledger(tmp_path, 0, 1)
    for step in (1, 2):
        first, last = (ledger.enter(step, layer, "native", 8) for layer in (2, 0))
        ledger.leave(last, 0)  # layer 0, started last, completes first ...
        ledger.leave(first, 0)  # ... and the bucket of layers 2..1 after it
    ledger.close()
    assert collectives(ledger.path) == [(1, 2), (1, 0), (2, 2), (2, 0)]


def test_an_error_writes_the_open_collectives_after_the_completed_ones(tmp_path):
    ledger = Ledger(tmp_path, 0, 1)
    first, last = (ledger.enter(1, layer, "ring", 8) for layer in (1, 0))
    ledger.leave(last, 0)
    ledger.flush(error="boom")
    ledger.close()
    records = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    assert [(r.get("layer"), r.get("open", False)) for r in records[1:]] == \
        [(0, False), (1, True), (None, False)]
    assert records[-1]["type"] == "error"
