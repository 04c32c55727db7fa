"""``mpitrain report RUN_DIR``: one self-contained page, ``RUN_DIR/report.html``, showing
what happened in a run, and a short summary on the terminal.

The page's parts, each a figure drawn from one series function (or a line saying why its
data is absent): training curves with the fault events on them, rank 0's step time, every
rank's time, the overlap, each layer's allreduce, the communication matrix, traffic per
step, stragglers, the replicas' divergence.  Series: :mod:`~mpitrain.tools.report_data`,
:mod:`~mpitrain.tools.report_ledger`; figures: :mod:`~mpitrain.tools.report_figures`,
:mod:`~mpitrain.tools.report_figures_net`; the page: :mod:`~mpitrain.tools.report_html`.
Works on a run that failed part way and on any rank count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import checkpoint
from ..errors import MpitrainError
from . import report_data as data
from . import report_figures as figs
from . import report_figures_net as net
from . import report_ledger as ledger
from .report_html import Section, esc, page, table
from .report_run import Absent, Run, load_run
from .report_summary import run_lines

OVERLAP_DEFINITION = (
    "Overlap is the share of the time gradients were in flight during which rank 0 computed "
    "instead of communicating. Per step: <i>window</i> = the time at least one of rank 0's "
    "allreduces was open, from entry to exit (union over its collective ledger's records); "
    "<i>exposed</i> = time_comm + time_wait of metrics.jsonl (the time rank 0 spent inside "
    "communication calls or blocked waiting); overlap = max(0, window &minus; exposed) / "
    "window. 100% would mean communication entirely hidden behind the backward pass; with "
    "overlap off, or when communication advances only inside MPI calls, it is near 0%. The "
    "total weighs each step by its window. End-to-end checks count as exposed time.")


def figure_section(key: str, title: str, caption: str, series: dict | Absent,
                   draw: Callable[[dict], str], extra: str = "") -> Section:
    """A section drawing ``series`` with ``draw``, or saying why it cannot."""
    if isinstance(series, Absent):
        return Section(key, title, caption, absent=series.reason)
    return Section(key, title, caption, svg=draw(series), data=series, extra=extra)


def _optional(series: dict | Absent) -> dict | None:
    return None if isinstance(series, Absent) else series


def training_section(run: Run) -> Section:
    loss, accuracy, marks = data.loss_series(run), data.accuracy_series(run), data.event_marks(run)
    stopped = None if run.finished or not run.steps else run.steps[-1]["step"]
    caption = ("Loss and accuracy from metrics.jsonl: thin lines per step (rank 0 reports the "
               "global batch), thick bars for each epoch's mean over its steps, validation at "
               "the end of each epoch. Markers on "
               "the loss curve and the strip below: faults injected (faults-rank*.jsonl, every "
               "rank), messages counted as lost, replica-check warnings (events.jsonl), steps "
               "that retransmitted bytes.")
    extra = _events_table(marks)
    if isinstance(loss, Absent):
        return Section("training", "Training", caption, absent=loss.reason, extra=extra)
    series = {"loss": loss, "accuracy": _optional(accuracy), "events": _optional(marks)}
    svg = figs.training_figure(loss, series["accuracy"], series["events"], stopped)
    return Section("training", "Training", caption, svg=svg, data=series, extra=extra)


def _events_table(marks: dict | Absent) -> str:
    if isinstance(marks, Absent):
        return f'<p class="absent">{esc(marks.reason)}</p>'
    rows = [[kind, sum(at["count"]), _steps_text(at["step"])] for kind, at in
            marks["kinds"].items()]
    return table(["event", "count", "at steps"], rows, key="events")


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:20])) + (f", ... ({len(steps)} steps)" if len(steps) > 20
                                              else "")


def time_sections(run: Run) -> list[Section]:
    overlap = ledger.overlap_series(run)
    return [
        figure_section("time", "Step time: compute, communication, waiting",
                       "Rank 0's seconds per step from metrics.jsonl: time_compute, time_comm "
                       "(inside communication calls while backward runs, and checks), time_wait "
                       "(blocked on gradients after backward); they add up to time_total.",
                       data.time_split_series(run), figs.time_split_figure),
        figure_section("ranks", "Every rank's time",
                       "From the collective ledgers, per rank: time with no collective in "
                       "flight (compute, data, optimizer), with one in flight, and waiting for "
                       "the last rank to arrive at a collective (the straggler attribution of "
                       "mpitrain diagnose).", ledger.rank_time_split(run), figs.rank_split_figure),
        figure_section("overlap", "Overlap of communication and computation",
                       OVERLAP_DEFINITION, overlap, figs.overlap_figure),
    ]


def network_sections(run: Run) -> list[Section]:
    strag = ledger.straggler_series(run)
    verdict, named = "", None
    if not isinstance(strag, Absent):
        verdict = "<pre>" + esc("\n".join(strag["text"])) + "</pre>"
        named = _named_straggler(strag["text"])
    return [
        figure_section("layers", "Per-layer allreduce",
                       "Each layer's gradient allreduce (a fused bucket is named by its lowest "
                       "layer) from the collective ledgers of all ranks; bytes on the wire from "
                       "traffic.json when the run counted them.",
                       ledger.layer_series(run), net.layer_figure),
        figure_section("matrix", "Communication matrix",
                       "Payload bytes each rank sent to each other rank over the whole run "
                       "(traffic.json; row: source, column: destination).",
                       data.matrix_series(run), net.matrix_figure),
        figure_section("traffic", "Traffic per step",
                       "Rank 0's gradient payload per step (metrics.jsonl), retransmissions "
                       "apart.", data.traffic_step_series(run), net.traffic_figure),
        figure_section("stragglers", "Straggler attribution",
                       "Who arrived last at the collectives every rank entered and left, and "
                       "who held the others up (mpitrain diagnose's reading of the ledgers; its "
                       "verdict below).", strag, lambda s: net.straggler_figure(s, named),
                       extra=verdict),
        figure_section("divergence", "Replica divergence",
                       "Whether the replicas still agree, per layer and step: two ranks hold "
                       "the same layer after a step when they held it before and their reduced "
                       "gradients had the same checksum (ledgers). Lost messages from "
                       "faults-rank*.jsonl, check warnings from events.jsonl.",
                       ledger.divergence_series(run), net.divergence_figure),
    ]


def _named_straggler(lines: list[str]) -> int | None:
    """The rank diagnose calls the straggler ("straggler: rank N ..."), if it names one."""
    first = lines[0] if lines else ""
    return int(first.split()[2]) if first.startswith("straggler: rank ") else None


def first_error(run: Run) -> str | None:
    """The first synchronization error a rank recorded in its ledger, if any."""
    if run.ledgers is None or not run.ledgers.errors:
        return None
    rank, record = run.ledgers.errors[0]
    return f"rank {rank}: {record.get('message')}"


def build_report(run: Run) -> tuple[str, list[tuple[str, str]]]:
    """The page for ``run`` and the summary lines it shows (the terminal prints them)."""
    s = data.summary(run)
    overlap = ledger.overlap_series(run)
    lines = run_lines(s, None if isinstance(overlap, Absent) else overlap["total"],
                      first_error(run))
    head = table(None, [list(line) for line in lines], key="summary")
    if not run.finished:
        head = (f'<p class="alert">This run did not finish (no model.npz): the report shows '
                f'what it wrote up to step {s["last_step"]}.</p>\n') + head
    sections = [Section("summary", "Summary", data=s, extra=head), training_section(run),
                *time_sections(run), *network_sections(run)]
    return page(f"mpitrain report: {run.name}", f"run folder {run.path}", sections), lines


def write_page(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; a folder we cannot write to is a user error."""
    try:
        checkpoint.write_text(path, text)
    except OSError as err:
        raise MpitrainError(f"cannot write {path}: {err.strerror or err}",
                            hint="check the folder's permissions and free space") from None


def main(run_dir: str, open_browser: bool = False) -> int:
    """``mpitrain report RUN_DIR``: write RUN_DIR/report.html, print the summary; 0."""
    run = load_run(run_dir)
    html, lines = build_report(run)
    out = run.path / "report.html"
    write_page(out, html)
    width = max(len(label) for label, _ in lines)
    for label, text in lines + [("report", str(out))]:
        print(f"{label.ljust(width)}  {text}")
    if open_browser:
        import webbrowser
        webbrowser.open(out.resolve().as_uri())
    return 0
