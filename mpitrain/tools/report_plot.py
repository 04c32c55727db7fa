"""Shared matplotlib set-up of the report's figures: the backend, the style, the colours,
and the one way a figure leaves: as SVG text.

matplotlib is imported here, lazily (:func:`pyplot`), so that training never imports it;
the non-interactive Agg backend draws without a display.
"""
from __future__ import annotations

import functools
import io
from typing import Any

COMPUTE, COMM, WAIT = "#4C72B0", "#DD8452", "#C44E52"
TRAIN, VALIDATION = "#4C72B0", "#2E8B57"

# marker and colour of each kind of event on the loss curve and in the event strip
EVENT_STYLE = {
    "drop": ("v", "#C44E52"), "corrupt": ("X", "#8172B3"), "duplicate": ("D", "#937860"),
    "reorder": ("s", "#DA8BC3"), "delay": ("o", "#8C8C8C"), "crash": ("*", "#000000"),
    "slow": ("<", "#B8A136"), "lost (counted absent)": ("X", "#111111"),
    "divergence warning": ("^", "#FF7F0E"), "retransmitted": ("P", "#3A9BC1"),
    "sync error": ("*", "#CF222E"),
}

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "svg.hashsalt": "mpitrain-report", "figure.dpi": 100,
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def svg_figure(draw):
    """Decorator for a figure builder: ``draw(...)`` makes a matplotlib figure inside the
    report's style (so every artist takes it); the decorated function returns the figure
    as standalone SVG text (no date: the same run gives the same page) and closes it."""
    @functools.wraps(draw)
    def wrapper(*args, **kw) -> str:
        plt = pyplot()
        with plt.rc_context(STYLE):
            fig = draw(*args, **kw)
            buf = io.StringIO()
            fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        return buf.getvalue()
    return wrapper


def step_rows(rows: list[tuple[str, float]]):
    """A figure of full-width rows sharing the step axis, ``rows`` being (name, height in
    inches): returns (figure, name -> axes)."""
    fig, axes = pyplot().subplots(len(rows), 1, sharex=True, squeeze=False,
                                  figsize=(10.5, sum(h for _, h in rows) + 0.6),
                                  gridspec_kw={"height_ratios": [h for _, h in rows]})
    from matplotlib.ticker import MaxNLocator
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    return fig, {name: ax for (name, _), ax in zip(rows, axes[:, 0])}


def marker_style(kind: str) -> dict:
    """scatter() arguments for an event kind's markers (unknown kinds: a grey dot), with a
    white rim to stand out on a line or a dark cell."""
    marker, colour = EVENT_STYLE.get(kind, ("o", "#7F7F7F"))
    return {"marker": marker, "color": colour, "edgecolors": "white", "linewidths": 0.5}


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as MPI benchmarks print them)."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
