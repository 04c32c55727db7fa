"""`mpitrain report` and `mpitrain compare` on real runs: each figure's series against the
run's files, the series embedded in the page against the same files, runs that failed part
way, traffic accounting (a fixture file when the run has none), and the page in a real
browser (headless Chromium) with no console error and a screenshot that is not blank.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mpirun import run

from mpitrain.tools import report_data, report_ledger
from mpitrain.tools.report_run import Absent, load_run

SECTIONS = ["summary", "training", "time", "ranks", "overlap", "layers", "matrix", "traffic",
            "stragglers", "divergence"]


def mpitrain(*args: str, timeout: float = 120, cwd: Path | None = None):
    return run([sys.executable, "-m", "mpitrain", *args], timeout=timeout, cwd=cwd)


def train(tmp_path_factory, name: str, job: str, nprocs: int, *sets: str) -> Path:
    out = tmp_path_factory.mktemp(name)
    res = mpitrain("run", "-n", str(nprocs), job, "--set", f'run.out="{out}"',
                   "--set", 'run.progress="off"', *(a for s in sets for a in ("--set", s)))
    assert res.returncode == 0, res.output
    return out


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> Path:
    """2 ranks, reliable delivery, drops / corruptions / duplicates / reorders; 30 steps
    (one whole epoch and part of the next)."""
    return train(tmp_path_factory, "reliable", "jobs/faults/reliable.toml", 2, "run.steps=30")


@pytest.fixture(scope="module")
def lossy(tmp_path_factory) -> Path:
    """2 ranks, lossy delivery, one allgather chunk lost at step 3: the replicas diverge."""
    return train(tmp_path_factory, "lossy", "jobs/faults/lossy_allgather.toml", 2,
                 'faults.on_divergence="warn"', "run.steps=12")


@pytest.fixture(scope="module")
def straggler(tmp_path_factory) -> Path:
    """3 ranks, native MPI, rank 1 sleeps before every allreduce."""
    return train(tmp_path_factory, "straggler", "jobs/faults/straggler.toml", 3, "run.steps=8")


def records(path: Path, **match) -> list[dict]:
    """The JSON lines of ``path`` that parse and have the ``match`` items."""
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if all(rec.get(k) == v for k, v in match.items()):
            out.append(rec)
    return out


def rank_events(out: Path, event: str) -> list[dict]:
    return [r for f in sorted(out.glob("faults-rank*.jsonl")) for r in records(f, event=event)]


class Page(HTMLParser):
    """The parts of a report page the tests read: JSON data blocks by id, the sections'
    images and absence lines, and every URL the page refers to."""

    def __init__(self, text: str):
        super().__init__()
        self.data: dict[str, object] = {}
        self.images: dict[str, int] = {}
        self.absent: dict[str, str] = {}
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._section = self._block = None
        self._in_absent = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")]
        if tag == "section":
            self._section = a["id"]
        elif tag == "img":
            self.images[self._section] = self.images.get(self._section, 0) + 1
        elif tag == "p" and a.get("class") == "absent":
            self._in_absent = True
        elif tag == "script":
            assert a.get("type") == "application/json", "no script may run in the page"
            self._block = a["id"]

    def handle_endtag(self, tag):
        self._in_absent = self._in_absent and tag != "p"
        self._block = None if tag == "script" else self._block

    def handle_data(self, text):
        if self._block:
            self.data[self._block.removeprefix("data-")] = json.loads(text)
        elif self._in_absent and self._section:
            self.absent[self._section] = self.absent.get(self._section, "") + text


def report(out: Path) -> tuple[Page, str]:
    res = mpitrain("report", str(out))
    assert res.returncode == 0, res.output
    assert "Traceback" not in res.output
    return Page((out / "report.html").read_text()), res.stdout


@pytest.fixture(scope="module")
def faulty_report(faulty) -> tuple[Page, str]:
    """`mpitrain report` of the faulty run: the page and the terminal summary."""
    return report(faulty)


def assert_self_contained(page: Page) -> None:
    assert all(url.startswith("data:image/svg+xml;base64,") for url in page.urls), page.urls
    assert "link" not in page.tags and "iframe" not in page.tags


def assert_every_section(page: Page) -> None:
    """Each section shows a figure or says in one line why it cannot."""
    for key in SECTIONS:
        assert page.images.get(key) or page.absent.get(key) or key == "summary", key


# --------------------------------------------------------------------------- series = files
def test_training_series_are_the_metrics_records(faulty):
    steps = records(faulty / "metrics.jsonl", kind="step")
    epochs = records(faulty / "metrics.jsonl", kind="epoch")
    assert len(steps) == 30 and len(epochs) == 2
    run_ = load_run(faulty)
    loss, acc = report_data.loss_series(run_), report_data.accuracy_series(run_)
    assert loss["step"] == [r["step"] for r in steps] and loss["loss"] == [r["loss"] for r in steps]
    assert loss["epoch_step"] == [r["step"] for r in epochs]
    assert loss["epoch_loss"] == [r["loss"] for r in epochs]
    assert loss["val_loss"] == [r["val_loss"] for r in epochs]
    assert acc["accuracy"] == [r["accuracy"] for r in steps]
    assert acc["val_accuracy"] == [r["val_accuracy"] for r in epochs]
    split = report_data.time_split_series(run_)
    for key in ("compute", "comm", "wait", "total"):
        assert split[key] == [r[f"time_{key}"] for r in steps]


def test_event_marks_count_every_injected_fault(faulty):
    faults = rank_events(faulty, "fault")
    assert faults, "the reliable job injects faults"
    marks = report_data.event_marks(load_run(faulty))["kinds"]
    for kind in {f["kind"] for f in faults}:
        want = sorted(f["step"] for f in faults if f["kind"] == kind)
        got = sorted(s for s, c in zip(marks[kind]["step"], marks[kind]["count"]) for _ in range(c))
        assert got == want, kind
    summary = report_data.summary(load_run(faulty))
    transport = records(faulty / "events.jsonl", event="transport")[-1]
    assert summary["faults_total"] == len(faults)
    assert summary["retransmissions"] == transport["retransmissions"] > 0


def test_ledger_series_match_the_ledgers(faulty):
    run_ = load_run(faulty)
    colls = [r for f in sorted(faulty.glob("ledger-rank*.jsonl"))
             for r in records(f, type="collective")]
    layers = report_ledger.layer_series(run_)
    for i, layer in enumerate(layers["layer"]):
        mine = [c for c in colls if c["layer"] == layer]
        assert layers["collectives"][i] == len(mine) == 2 * 30
        assert layers["bytes"][i] == mine[0]["bytes"]
    overlap = report_ledger.overlap_series(run_)
    steps = {r["step"]: r for r in records(faulty / "metrics.jsonl", kind="step")}
    for step, exposed, share in zip(overlap["step"], overlap["exposed"], overlap["overlap"]):
        assert exposed == steps[step]["time_comm"] + steps[step]["time_wait"]
        assert 0 <= share <= 1
    split = report_ledger.rank_time_split(run_)
    assert split["rank"] == [0, 1]
    for k in range(2):
        parts = split["compute"][k] + split["comm"][k] + split["wait"][k]
        assert parts == pytest.approx(split["span"][k]) and split["wait"][k] >= 0
    assert isinstance(report_ledger.divergence_series(run_), Absent), "reliable: no divergence"


# --------------------------------------------------------------------------- the page
def test_report_page_embeds_what_it_draws(faulty, faulty_report):
    page, stdout = faulty_report
    assert_self_contained(page)
    assert_every_section(page)
    steps = records(faulty / "metrics.jsonl", kind="step")
    training = page.data["training"]
    assert training["loss"]["loss"] == [r["loss"] for r in steps]
    assert training["accuracy"]["accuracy"] == [r["accuracy"] for r in steps]
    assert page.data["time"]["wait"] == [r["time_wait"] for r in steps]
    assert sum(training["events"]["kinds"]["drop"]["count"]) == \
        len([f for f in rank_events(faulty, "fault") if f["kind"] == "drop"])
    summary = page.data["summary"]
    assert summary["loss"] == steps[-1]["loss"] and summary["steps"] == 30
    assert summary["time"]["total"] == pytest.approx(sum(r["time_total"] for r in steps))
    assert page.data["stragglers"]["rank"] == [0, 1]
    # the terminal summary says the same
    assert f"loss {steps[-1]['loss']:.4f}" in stdout and "30 (finished)" in stdout
    assert f"{summary['retransmissions']} retransmissions" in stdout
    assert f"report  {faulty / 'report.html'}" in stdout


def test_a_run_without_traffic_accounting_says_so(faulty, faulty_report):
    page, _ = faulty_report
    if (faulty / "traffic.json").exists():  # runs count traffic: the map is the file's
        want = json.loads((faulty / "traffic.json").read_text())["matrix_bytes"]
        assert page.data["matrix"]["matrix_bytes"] == want
    else:
        assert "no traffic accounting in this run" in page.absent["matrix"]
        assert "no traffic accounting in this run" in page.absent["traffic"]


def write_traffic_fixture(out: Path) -> dict:
    """Traffic accounting's files, as a run that counts traffic writes them: per-step
    bytes and messages in metrics.jsonl (rank 0) and traffic.json (whole run)."""
    lines = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "step":
            s = rec["step"]
            rec.update(bytes_sent=1000 * s, bytes_received=1000 * s + 7,
                       bytes_retransmitted=64 * (s % 3 == 0), messages_sent=4,
                       messages_received=4)
        lines.append(json.dumps(rec))
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    p = 2
    traffic = {"ranks": p, "algorithm": "ring", "modelled": False,
               "matrix_bytes": [[0, 123456], [654321, 0]],
               "matrix_messages": [[0, 60], [60, 0]],
               "retransmitted_bytes": [[0, 512], [0, 0]],
               "per_layer": {"0": {"bytes": 700000, "messages": 60},
                             "1": {"bytes": 77777, "messages": 60}}}
    (out / "traffic.json").write_text(json.dumps(traffic))
    return traffic


def test_traffic_accounting_is_drawn_from_its_files(faulty, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(faulty, out)
    traffic = write_traffic_fixture(out)
    page, _ = report(out)
    assert page.images.get("matrix") and page.images.get("traffic")
    assert page.data["matrix"]["matrix_bytes"] == traffic["matrix_bytes"]
    assert page.data["matrix"]["retransmitted_bytes"] == traffic["retransmitted_bytes"]
    steps = records(out / "metrics.jsonl", kind="step")
    for key in ("bytes_sent", "bytes_received", "bytes_retransmitted", "messages_sent"):
        assert page.data["traffic"][key] == [r[key] for r in steps]
    assert page.data["layers"]["wire_bytes"] == [700000, 77777]
    assert page.data["training"]["events"]["kinds"]["retransmitted"]["step"] == \
        [r["step"] for r in steps if r["bytes_retransmitted"]]


def test_a_run_cut_short_still_reports(faulty, tmp_path):
    """metrics.jsonl cut in the middle of a line, no epoch records, no model.npz."""
    out = tmp_path / "run"
    shutil.copytree(faulty, out)
    (out / "model.npz").unlink()
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line][:12]
    (out / "metrics.jsonl").write_text("\n".join(steps[:11]) + "\n" + steps[11][:40])
    page, stdout = report(out)
    assert_every_section(page)
    assert page.data["training"]["loss"]["step"] == list(range(1, 12))
    assert page.data["training"]["loss"]["epoch_step"] == []
    assert "stopped after step 11: no model.npz" in stdout
    assert "1 line(s) cut short were skipped" in stdout


def test_a_run_stopped_by_a_fault_reports_the_error(tmp_path):
    res = mpitrain("run", "-n", "2", "jobs/faults/strict_drop.toml", "--set",
                   f'run.out="{tmp_path}"')
    assert res.returncode == 3
    page, stdout = report(tmp_path)
    assert "stopped after step 2: no model.npz" in stdout
    assert "error   rank" in stdout and "received nothing from rank 1" in stdout
    assert page.data["training"]["events"]["kinds"]["sync error"]["step"] == [3]


def test_lossy_divergence_is_drawn_per_layer(lossy):
    page, _ = report(lossy)
    div = page.data["divergence"]
    lost = rank_events(lossy, "lost")
    assert [(e["step"], e["layer"], e["rank"]) for e in div["lost"]] == \
        [(e["step"], e["layer"], e["rank"]) for e in lost] == [(3, 1, 0)]
    # layer 1 splits into two replicas at step 3 and stays split; layer 0 never does
    assert div["groups"]["1"] == [1, 1] + [2] * 10 and div["groups"]["0"] == [1] * 12
    warnings = records(lossy / "events.jsonl", event="divergence")
    assert [c["step"] for c in div["checks"]] == [w["step"] for w in warnings]
    assert page.images.get("divergence")


def test_three_ranks_name_the_straggler(straggler):
    page, stdout = report(straggler)
    assert "3 ranks, native allreduce" in stdout
    strag = page.data["stragglers"]
    assert strag["rank"] == [0, 1, 2]
    assert strag["last_count"][1] == strag["collectives"] > 0
    assert strag["text"][0].startswith("straggler: rank 1")
    assert page.data["ranks"]["rank"] == [0, 1, 2]


# --------------------------------------------------------------------------- compare
def test_compare_overlays_runs_and_tabulates_them(faulty, lossy, tmp_path):
    res = mpitrain("compare", str(faulty), str(lossy), "--out", str(tmp_path / "cmp.html"))
    assert res.returncode == 0, res.output
    page = Page((tmp_path / "cmp.html").read_text())
    assert_self_contained(page)
    rows = {row[0]: row for row in page.data["table"]["rows"]}
    headers = page.data["table"]["headers"]
    for out in (faulty, lossy):
        steps = records(out / "metrics.jsonl", kind="step")
        row = dict(zip(headers, rows[out.name]))
        assert row["final loss"] == f"{steps[-1]['loss']:.4f}"
        assert row["faults"] == str(len(rank_events(out, "fault")))
        assert page.data["curves"][out.name]["loss"]["loss"] == [r["loss"] for r in steps]
        assert out.name in res.stdout and row["final loss"] in res.stdout
    assert dict(zip(headers, rows[lossy.name]))["lost"] == "1"


def test_compare_writes_into_the_current_folder(faulty, lossy, tmp_path):
    res = mpitrain("compare", str(faulty), str(lossy), cwd=tmp_path)
    assert res.returncode == 0, res.output
    assert (tmp_path / "compare.html").is_file()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["report", "no/such/run"], "no/such/run does not exist"),
    (["report", "setup.cfg"], "setup.cfg is not a folder"),
    (["report", "docs"], "docs holds no metrics.jsonl"),
    (["compare", "docs"], "compare needs two or more run folders, got 1"),
    (["compare", "docs", "no/such/run"], "docs holds no metrics.jsonl"),
])
def test_bad_input_is_one_message_and_exit_2(args, message):
    res = mpitrain(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert lines[0].startswith("mpitrain: error: ") and message in lines[0], res.stderr
    assert lines[1].startswith("  hint: ")


def test_help_describes_report_and_compare():
    res = mpitrain("--help")
    for command in ("report", "compare"):
        line = next(x for x in res.stdout.splitlines() if x.strip().startswith(command))
        assert len(line.split()) > 3, line
    for command in ("report", "compare"):
        helped = mpitrain(command, "--help").stdout
        assert "RUN_DIR" in helped or "run_dir" in helped


def test_training_never_imports_matplotlib():
    code = ("import sys, mpitrain.cli, mpitrain.train, mpitrain.tools.diagnose; "
            "print('matplotlib' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "False", res.stderr


# --------------------------------------------------------------------------- a real browser
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to check the report in a real browser: install "
                "it with `apt-get update && apt-get install -y --no-install-recommends "
                "chromium` (Debian's package)")


def test_the_report_loads_in_chromium_without_errors(faulty, faulty_report, tmp_path):
    shot = tmp_path / "report.png"
    res = run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
               "--window-size=1200,3000", (faulty / "report.html").as_uri()], timeout=120)
    # every console message (a script error, a refused or missing resource) is logged so
    console = [line for line in res.output.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], "\n".join(console)
    from PIL import Image
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500, "the screenshot is (nearly) blank"
