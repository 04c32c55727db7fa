"""The timeline of chosen steps (`[trace] steps`): trace.json is a valid Chrome trace / Perfetto
file of every rank, its flows join each send to its receipt, and it holds the chosen steps
with the faults, retransmissions, checks and errors that happened in them."""
import json
from collections import defaultdict
from numbers import Number

import pytest

from mpirun import mpitrain
from mpitrain import config, trace, trace_file
from mpitrain.comm.wire import MessageId
from mpitrain.errors import ConfigError

LAYERS = "[16, 10]"
REQUIRED = {  # per event phase: required keys, besides "ph", "name" and "pid"
    "X": {"ts", "dur", "tid", "cat"}, "i": {"ts", "tid", "s", "cat"},
    "s": {"ts", "tid", "id", "cat"}, "f": {"ts", "tid", "id", "cat", "bp"}, "M": {"args"}}
METADATA_NAMES = {"process_name", "process_sort_index", "thread_name", "thread_sort_index"}


def run(tmp_path, p, *args, steps="2-3", expect=0, name="run"):
    out = tmp_path / name
    trace_key = ["--set", f'trace.steps="{steps}"'] if steps is not None else []
    res = mpitrain(p, ["run", "--set", "run.steps=5", "--set", f"model.layers={LAYERS}",
                       "--set", 'sync.algorithm="ring"', *trace_key, *args,
                       "--set", f'run.out="{out}"'], timeout=120)
    assert res.returncode == expect, res.output
    return out


def load(out):
    doc = json.loads((out / "trace.json").read_text())
    check_schema(doc)
    return doc, [e for e in doc["traceEvents"] if e["ph"] != "M"]


def check_schema(doc):
    """The Trace Event Format's JSON object form, as Perfetto and chrome://tracing read it."""
    assert set(doc) == {"traceEvents", "displayTimeUnit", "metadata"}
    assert doc["displayTimeUnit"] in ("ms", "ns") and isinstance(doc["metadata"], dict)
    for e in doc["traceEvents"]:
        assert e["ph"] in REQUIRED, e
        assert REQUIRED[e["ph"]] | {"ph", "name", "pid"} <= set(e), e
        assert isinstance(e["name"], str) and type(e["pid"]) is int, e
        if "tid" in e:
            assert type(e["tid"]) is int, e
        for key in ("ts", "dur"):
            if key in e:
                assert isinstance(e[key], Number) and not isinstance(e[key], bool), e
        assert e.get("dur", 0) >= 0 and e.get("s", "t") in ("t", "p", "g"), e
        if e["ph"] in "sf":
            assert isinstance(e["id"], (int, str)), e
        if e["ph"] == "f":
            assert e["bp"] == "e", e
        if e["ph"] == "M":
            assert e["name"] in METADATA_NAMES and isinstance(e["args"], dict), e


def check_flows(events):
    """Every flow start has exactly one end with the same id and cat, on another rank."""
    flows = defaultdict(lambda: {"s": [], "f": []})
    for e in events:
        if e["ph"] in "sf":
            flows[(e["cat"], e["id"])][e["ph"]].append(e)
    assert flows, "no message flows"
    for key, ends in flows.items():
        assert len(ends["s"]) == 1 and len(ends["f"]) == 1, (key, ends)
        assert ends["s"][0]["pid"] != ends["f"][0]["pid"], ends
    return {key: (ends["s"][0], ends["f"][0]) for key, ends in flows.items()}


def check_tracks(events):
    """Per rank and track, events in time order and spans properly nested (as Perfetto
    draws them: a span within another, or after it)."""
    tracks = defaultdict(list)
    for e in events:
        tracks[(e["pid"], e["tid"])].append(e)
    for track, evs in tracks.items():
        times = [e["ts"] for e in evs]
        assert times == sorted(times), f"track {track} goes back in time"
        open_ends = []
        for e in (e for e in evs if e["ph"] == "X"):
            while open_ends and e["ts"] >= open_ends[-1] - 1e-3:
                open_ends.pop()
            end = e["ts"] + e["dur"]
            assert not open_ends or end <= open_ends[-1] + 1e-3, (track, e)
            open_ends.append(end)
    return tracks


def check_only_steps(events, ranks, steps):
    spans = defaultdict(set)
    for e in events:
        assert e["args"]["step"] in steps, e
        if e["cat"] == "step":
            spans[e["pid"]].add(e["name"])
    assert spans == {r: {f"step {s}" for s in steps} for r in range(ranks)}


@pytest.mark.parametrize("p", [2, 3])
def test_a_traced_ring_run_with_a_drop(tmp_path, p):
    out = run(tmp_path, p, "--set", 'faults.delivery="reliable"', "--set", "sync.check_every=2",
              "--fault", "kind=drop,step=2,layer=0,src=1,count=1")
    doc, events = load(out)
    assert doc["metadata"]["ranks"] == p and doc["metadata"]["missing_ranks"] == []
    flows = check_flows(events)
    tracks = check_tracks(events)
    check_only_steps(events, p, {2, 3})
    names = {(e["pid"], e["tid"], e["name"]) for e in events}
    for r in range(p):
        assert {(r, trace.COMPUTE, n) for n in
                ("forward", "backward layer 0", "backward layer 1", "optimizer")} <= names
        assert {(r, trace.COMM, "wait for gradients"), (r, trace.COMM, "wait for statistics"),
                (r, trace.COMM, "replica check"), (r, trace.COMM, "replicas equal")} <= names
        for layer in (0, 1):  # each allreduce, its phases inside it
            track = tracks[(r, trace.ALLREDUCE + layer)]
            spans = [e for e in track if e["ph"] == "X"]
            assert [e["name"] for e in spans] == \
                ["ring allreduce", "reduce_scatter", "allgather"] * 2
    drop = [e for e in events if e["ph"] == "i" and e["cat"] == "fault"]
    assert [(d["pid"], d["args"]["kind"], d["args"]["step"]) for d in drop] == [(1, "drop", 2)]
    # the dropped message: sent once, received once -- its retransmission
    hit = drop[0]["args"]
    sent, got = next(v for v in flows.values() if v[0]["pid"] == 1 and v[0]["args"]["step"] == 2
                     and v[0]["args"]["layer"] == 0 and v[0]["name"] == hit["phase"]
                     and (v[0]["args"]["to"], v[0]["args"]["chunk"]) == (hit["dst"], hit["chunk"]))
    resent = [e for e in events if e["name"] == "retransmission" and e["pid"] == 1
              and e["args"]["seq"] == sent["args"]["seq"]]
    assert resent and sent["ts"] < resent[0]["ts"] < got["ts"], (sent, resent, got)


def test_a_failed_run_keeps_its_timeline(tmp_path):
    """A strict drop stops the run in step 3: every rank's part is merged all the same,
    with the error and the step that never finished."""
    out = run(tmp_path, 2, "--set", "faults.deadline_ms=1000",
              "--fault", "kind=drop,step=3,layer=0,src=1,count=1", expect=3)
    doc, events = load(out)
    assert doc["metadata"]["missing_ranks"] == [] and not list(out.glob("trace-rank*.json"))
    check_tracks(events)
    errors = [e for e in events if e["cat"] == "error"]
    assert sorted(e["pid"] for e in errors) == [0, 1]
    assert all("received nothing from rank 1" in e["args"]["message"] for e in errors)
    unfinished = {(e["pid"], e["name"]) for e in events if "unfinished" in e["args"]}
    assert {(0, "step 3"), (1, "step 3"), (0, "ring allreduce")} <= unfinished


def test_lossy_messages_counted_absent_end_their_flow(tmp_path):
    out = run(tmp_path, 2, "--set", 'faults.delivery="lossy"', "--set",
              'faults.on_divergence="warn"', "--fault",
              "kind=drop,step=2,layer=1,src=0,phase=allgather", steps="2")
    _, events = load(out)
    flows = check_flows(events)
    absent = [f for s, f in flows.values() if f["args"].get("absent")]
    assert [(f["pid"], f["args"]["step"], f["name"]) for f in absent] == [(1, 2, "allgather")]
    assert any(e["name"] == "error" and e["pid"] == 1 for e in events)  # the check saw it


def test_no_trace_unless_asked(tmp_path):
    out = run(tmp_path, 2, steps=None)
    assert (out / "metrics.jsonl").exists() and not (out / "trace.json").exists()


def test_messages_off_keeps_spans_and_leaves_out_flows():
    t = trace.Tracer(0, 2, (1, 1), messages=False)
    mid = MessageId(1, 0, "ring", "reduce_scatter", 0, 0, 1)
    t.begin_step(1)
    t.sent(mid, 0, 8)
    t.accepted(mid._replace(src=1, dst=0), 0, 8)
    t.close_open("test")
    assert [e["ph"] for e in t.events] == ["X", "X"]  # the phase, the step
    t2 = trace.Tracer(0, 2, (1, 1))
    t2.begin_step(1)
    t2.sent(mid, 0, 8)
    assert [e["ph"] for e in t2.events] == ["s"] and t2.events[0]["id"] == t2.flow_id(0, 1, 0)


def test_outside_the_window_nothing_is_recorded():
    t = trace.Tracer(0, 2, (2, 3))
    for step in range(1, 6):
        t.begin_step(step)
        with t.span("forward"):
            pass
        t.end_step(step)
    assert sorted({e["args"]["step"] for e in t.events}) == [2, 3]
    assert not trace.OFF.on and trace.OFF.backward([1, 0]) == [1, 0]


def test_parts_merge_into_one_trace(tmp_path):
    for rank in (1, 0):
        t = trace.Tracer(rank, 3, (1, 1), out=tmp_path, meta={"ranks": 3})
        t.begin_step(1)
        t.end_step(1)
        trace_file.write_part(tmp_path, rank, t.part())
    path = trace_file.merge(tmp_path, 3)
    doc = json.loads(path.read_text())
    check_schema(doc)
    assert doc["metadata"]["missing_ranks"] == [2] and not list(tmp_path.glob("trace-rank*"))
    assert [e["pid"] for e in doc["traceEvents"]] == sorted(e["pid"] for e in doc["traceEvents"])


@pytest.mark.parametrize("steps,says", [("3-2", "must not exceed"), ("x", "not a step range"),
                                        ("0", "count from 1"), ("2-", "not a step range")])
def test_a_bad_window_is_one_clear_message(steps, says):
    with pytest.raises(ConfigError, match=says) as err:
        config.load(None, [f'trace.steps="{steps}"'])
    assert '"A-B"' in err.value.message and "\n" not in err.value.message


def test_a_window_after_the_last_step_is_refused():
    cfg = config.load(None, ['trace.steps="7-9"'])
    with pytest.raises(ConfigError, match="the run has 5 steps"):
        trace.check_window(cfg, 5, "job.toml")
    trace.check_window(cfg, 7, "job.toml")
    assert config.load(None, ['trace.steps="4"']).trace.window == (4, 4)
    assert config.load(None, []).trace.window is None
