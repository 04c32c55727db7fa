"""``mpitrain compare RUN_DIR RUN_DIR ...``: two or more runs on one picture.

Overlaid loss and accuracy curves, each run's mean step time split, and a side-by-side
table (final loss, validation accuracy, steps/s, time split, faults injected,
retransmissions, lost messages): e.g. loss rates 0, 0.1% and 1% under reliable delivery,
or strict against lossy -- what one lost message costs.  Writes one self-contained page
(``compare.html`` in the current folder, or ``--out FILE``) and prints the table.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MpitrainError
from . import report_data as data
from .report import write_page
from .report_html import Section, page, table
from .report_plot import COMM, COMPUTE, WAIT, pyplot, step_rows, svg_figure
from .report_run import Absent, Run, load_run
from .report_summary import COMPARE_HEADERS, compare_row, text_table


def run_labels(run_dirs: list[str]) -> list[str]:
    """Short names for the runs: their folders' names, or the paths as given when two
    folders share a name."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


@svg_figure
def curves_figure(curves: dict[str, dict]):
    """Each run's loss and accuracy per step (lines) and validation per epoch (squares),
    in one colour per run."""
    has_accuracy = any(c["accuracy"]["step"] or c["accuracy"]["val_step"]
                       for c in curves.values())
    fig, axes = step_rows([("loss", 3.4)] + [("accuracy", 2.4)] * has_accuracy)
    colours = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, c) in enumerate(curves.items()):
        colour = colours[k % len(colours)]
        for name in axes:
            series = c[name]
            axes[name].plot(series["step"], series[name], color=colour, lw=1.2, alpha=0.85,
                            label=f"{label}")
            if series["val_step"]:
                axes[name].plot(series["val_step"], series[f"val_{name}"], "s--",
                                color=colour, ms=4, lw=1)
    for name, ax in axes.items():
        ax.set_ylabel(name)
        ax.set_title(f"{name}: per step (lines), validation at the end of each epoch "
                     f"(squares)", loc="left")
        ax.legend(loc="best", ncol=2)
    axes[list(axes)[-1]].set_xlabel("step")
    return fig


@svg_figure
def split_figure(labels: list[str], summaries: list[dict]):
    """Each run's mean step time on rank 0, stacked: compute, communication, waiting."""
    fig, ax = pyplot().subplots(figsize=(10.5, 0.7 + 0.42 * len(labels)), layout="constrained")
    left = np.zeros(len(labels))
    for key, colour, name in (("compute", COMPUTE, "compute"), ("comm", COMM, "communication"),
                              ("wait", WAIT, "waiting")):
        ms = np.array([1e3 * s["time"][key] / s["steps"] if s["steps"] else 0.0
                       for s in summaries])
        ax.barh(range(len(labels)), ms, left=left, color=colour, label=name, height=0.65)
        left += ms
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (mean over the run, rank 0)")
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1.0), ncol=3, frameon=False)
    ax.set_title("where a step's time went", loc="left")
    return fig


def _curves(run: Run) -> dict:
    """The loss and accuracy series of a run, empty where the run has none."""
    empty: dict[str, list] = {"step": [], "val_step": [], "epoch_step": []}
    out = {}
    for name, series in (("loss", data.loss_series(run)), ("accuracy", data.accuracy_series(run))):
        out[name] = {**empty, name: [], f"val_{name}": []} if isinstance(series, Absent) \
            else series
    return out


def build_compare(labels: list[str], runs: list[Run]) -> tuple[str, list[list[str]]]:
    """The page comparing ``runs`` (named ``labels``) and its table's rows."""
    summaries = [data.summary(run) for run in runs]
    rows = [compare_row(label, s) for label, s in zip(labels, summaries)]
    curves = {label: _curves(run) for label, run in zip(labels, runs)}
    sections = [
        Section("table", "Side by side", "Final figures of each run: the last step's training "
                "loss, the last epoch's validation, rank 0's time split; faults injected "
                "(all ranks), retransmissions and lost messages (transport counters).",
                data={"headers": COMPARE_HEADERS, "rows": rows, "runs": summaries},
                extra=table(COMPARE_HEADERS, rows, key="compare")),
        Section("curves", "Loss and accuracy", svg=curves_figure(curves), data=curves),
        Section("time", "Step time", svg=split_figure(labels, summaries)),
    ]
    folders = ", ".join(str(run.path) for run in runs)
    return page(f"mpitrain compare: {' vs '.join(labels)}", f"runs {folders}", sections), rows


def output_path(out: str) -> Path:
    """Where the page goes: ``out``, or ``out``/compare.html when ``out`` is a folder."""
    path = Path(out)
    if path.is_dir():
        return path / "compare.html"
    if not path.parent.is_dir():
        raise MpitrainError(f"--out {out}: the folder {path.parent} does not exist",
                            hint="create it first, or give a file in an existing folder")
    return path


def main(run_dirs: list[str], out: str = "compare.html") -> int:
    """``mpitrain compare``: write the page, print the table; 0."""
    if len(run_dirs) < 2:
        raise MpitrainError(f"compare needs two or more run folders, got {len(run_dirs)}",
                            hint="e.g. mpitrain compare runs/loss_sweep/rate-0 "
                                 "runs/loss_sweep/rate-0.01")
    path = output_path(out)
    runs = [load_run(d) for d in run_dirs]
    labels = run_labels(run_dirs)
    html, rows = build_compare(labels, runs)
    write_page(path, html)
    print(text_table(COMPARE_HEADERS, rows))
    print(f"\ncompare: {path}")
    return 0
