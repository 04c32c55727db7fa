"""The report's figures about training and time: loss and accuracy with the run's fault
events, the step time split, each rank's time, the overlap.

Each builder takes the series of :mod:`mpitrain.tools.report_data` /
:mod:`mpitrain.tools.report_ledger` (never a file) and returns SVG text.  The network
figures are in :mod:`mpitrain.tools.report_figures_net`.
"""
from __future__ import annotations

import numpy as np

from .report_plot import (COMM, COMPUTE, TRAIN, VALIDATION, WAIT, marker_style, pyplot,
                          step_rows, svg_figure)


def _curve_axis(ax, series: dict, key: str, label: str) -> None:
    """Per-step values (thin), epoch training values and validation values of ``key``."""
    if series["step"]:
        ax.plot(series["step"], series[key], color=TRAIN, lw=1, alpha=0.55,
                label=f"training {label} (each step's global batch)")
    if series["epoch_step"]:
        # an epoch's mean belongs to all its steps: a bar from its first step to its last
        ends = series["epoch_step"]
        starts = [1] + [end + 1 for end in ends[:-1]]
        ax.hlines(series[f"epoch_{key}"], np.asarray(starts) - 0.5, np.asarray(ends) + 0.5,
                  color=TRAIN, lw=2.5, label=f"training {label} (epoch mean, over its steps)")
    if series["val_step"]:
        ax.plot(series["val_step"], series[f"val_{key}"], "s--", color=VALIDATION, ms=4,
                lw=1.5, label=f"validation {label} (end of epoch)")
    ax.set_ylabel(label)


def _mark_events(ax, loss: dict, marks: dict) -> None:
    """Each event kind as markers on the loss curve, at the step it happened."""
    steps, values = loss["step"], loss["loss"]
    if not steps:
        return
    for kind, at in marks["kinds"].items():
        y = np.interp(at["step"], steps, values)
        ax.scatter(at["step"], y, s=36, zorder=3, label=f"{kind} ({sum(at['count'])})",
                   **marker_style(kind))


def _event_strip(ax, marks: dict) -> None:
    """One row per event kind; a marker per step, bigger for more events in that step."""
    kinds = list(marks["kinds"])
    for row, kind in enumerate(kinds):
        at = marks["kinds"][kind]
        ax.scatter(at["step"], [row] * len(at["step"]), **marker_style(kind),
                   s=[18 + 14 * min(c, 8) for c in at["count"]])
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_ylim(-0.7, len(kinds) - 0.3)
    ax.grid(axis="y", alpha=0)
    ax.set_title("events per step (all ranks; bigger marker: more in that step)", loc="left")


@svg_figure
def training_figure(loss: dict, accuracy: dict | None, marks: dict | None,
                    stopped_after: int | None):
    """Loss (with the events on it), accuracy, and the event strip, on one step axis.

    ``accuracy`` / ``marks`` None: left out.  ``stopped_after``: the last step of a run
    that did not finish (a line marks where it stopped).
    """
    rows = [("loss", 3.2)]
    if accuracy is not None:
        rows.append(("accuracy", 2.2))
    if marks is not None:
        rows.append(("events", 0.45 + 0.32 * len(marks["kinds"])))
    fig, axes = step_rows(rows)
    ax = axes["loss"]
    _curve_axis(ax, loss, "loss", "loss")
    if marks is not None:
        _mark_events(ax, loss, marks)
    ax.set_title("training and validation loss; fault events on the curve", loc="left")
    if accuracy is not None:
        _curve_axis(axes["accuracy"], accuracy, "accuracy", "accuracy")
        axes["accuracy"].set_title("accuracy", loc="left")
    if marks is not None:
        _event_strip(axes["events"], marks)
    for name, axis in axes.items():
        if stopped_after is not None:
            axis.axvline(stopped_after + 0.5, color="#000000", ls=":", lw=1.2,
                         label="run stopped (no model.npz)" if name == "loss" else None)
        if name != "events":
            axis.legend(loc="best", ncol=2)
    list(axes.values())[-1].set_xlabel("step")
    return fig


@svg_figure
def time_split_figure(split: dict):
    """Rank 0's step time, stacked: compute, communication calls, waiting (ms)."""
    fig, axes = step_rows([("time", 3.0)])
    ax = axes["time"]
    ms = {k: 1e3 * np.asarray(split[k]) for k in ("compute", "comm", "wait")}
    ax.stackplot(split["step"], ms["compute"], ms["comm"], ms["wait"], step="mid",
                 colors=[COMPUTE, COMM, WAIT], alpha=0.85,
                 labels=["compute", "communication calls (during backward, checks)",
                         "waiting for gradients (after backward)"])
    ax.set_ylabel("ms per step")
    ax.set_xlabel("step")
    ax.set_title("rank 0: where each step's time went", loc="left")
    ax.legend(loc="upper right")
    return fig


@svg_figure
def rank_split_figure(split: dict):
    """Every rank's time (ledgers), as shares of its span: compute, communication, waiting."""
    ranks = split["rank"]
    fig, ax = pyplot().subplots(figsize=(10.5, 0.55 + 0.38 * len(ranks)))
    left = np.zeros(len(ranks))
    for key, colour, label in (("compute", COMPUTE, "no collective in flight (compute)"),
                               ("comm", COMM, "collective in flight"),
                               ("wait", WAIT, "waiting for the last rank to arrive")):
        share = 100 * np.asarray(split[key]) / np.maximum(split["span"], 1e-12)
        ax.barh(ranks, share, left=left, color=colour, label=label, height=0.7)
        for y, x0, w in zip(ranks, left, share):
            if w >= 6:
                ax.text(x0 + w / 2, y, f"{w:.0f}%", ha="center", va="center", color="white",
                        fontsize=8)
        left += share
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the rank's time from its first collective to its last")
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1.0), ncol=3, frameon=False)
    ax.set_title("every rank's time (collective ledgers)", loc="left")
    return fig


@svg_figure
def overlap_figure(overlap: dict):
    """Per step: rank 0's communication window against its exposed communication, and the
    overlap percentage between them."""
    fig, axes = step_rows([("times", 2.4), ("overlap", 1.6)])
    ax = axes["times"]
    ax.plot(overlap["step"], 1e3 * np.asarray(overlap["window"]), "-", color=COMM, lw=1.5,
            label="gradients in flight (window)")
    ax.plot(overlap["step"], 1e3 * np.asarray(overlap["exposed"]), "--", color=WAIT, lw=1.2,
            label="not computing because of communication (exposed)")
    ax.set_ylabel("ms per step")
    ax.legend(loc="upper right")
    ax.set_title(f"rank 0: communication hidden behind computation "
                 f"({100 * overlap['total']:.0f}% over the run)", loc="left")
    ax = axes["overlap"]
    ax.bar(overlap["step"], 100 * np.asarray(overlap["overlap"]), width=0.8, color=COMPUTE)
    ax.set_ylim(0, 100)
    ax.set_ylabel("overlap %")
    ax.set_xlabel("step")
    return fig
