"""The report's figures about the network: the communication matrix, traffic per step,
each layer's allreduce, straggler attribution and the replicas' divergence.

Same conventions as :mod:`mpitrain.tools.report_figures`: series in, SVG text out.
"""
from __future__ import annotations

import numpy as np

from .report_plot import COMM, COMPUTE, WAIT, human_bytes, marker_style, pyplot, step_rows, \
    svg_figure


def _heat_map(fig, ax, matrix: np.ndarray, title: str, cmap: str) -> None:
    """A src x dst heat map with its colour bar; cells labelled when there are few."""
    image = ax.imshow(matrix, cmap=cmap, vmin=0)
    p = matrix.shape[0]
    if p <= 8:
        top = matrix.max() or 1
        for src in range(p):
            for dst in range(p):
                ax.text(dst, src, human_bytes(matrix[src, dst]), ha="center", va="center",
                        fontsize=8, color="white" if matrix[src, dst] > 0.6 * top else "black")
    ax.set_xticks(range(p))
    ax.set_yticks(range(p))
    ax.set_xlabel("destination rank")
    ax.set_ylabel("source rank")
    ax.grid(False)
    ax.set_title(title, loc="left")
    from matplotlib.ticker import FuncFormatter
    fig.colorbar(image, ax=ax, shrink=0.85, format=FuncFormatter(lambda v, _: human_bytes(v)))


@svg_figure
def matrix_figure(matrix: dict):
    """Payload bytes between every pair of ranks over the run; retransmitted bytes beside
    it when there were any."""
    sent = np.asarray(matrix["matrix_bytes"], dtype=float)
    resent = np.asarray(matrix.get("retransmitted_bytes") or np.zeros_like(sent), dtype=float)
    panels = [(sent, "payload bytes, first transmissions", "Blues")]
    if resent.any():
        panels.append((resent, "bytes retransmitted", "Reds"))
    side = min(4.6 + 0.25 * sent.shape[0], 8.0)
    fig, axes = pyplot().subplots(1, len(panels), figsize=(side * len(panels), side * 0.85),
                                  squeeze=False, layout="constrained")
    for ax, (values, title, cmap) in zip(axes[0], panels):
        _heat_map(fig, ax, values, title, cmap)
    how = "modelled from the algorithm's volume (native MPI)" if matrix["modelled"] else "counted"
    fig.suptitle(f"communication matrix, whole run ({matrix['algorithm']}; {how})",
                 x=0.02, ha="left", fontsize=10)
    return fig


@svg_figure
def traffic_figure(traffic: dict):
    """Rank 0's payload bytes (and messages, when counted) per step."""
    rows = [("bytes", 2.6)] + [("messages", 1.8)] * ("messages_sent" in traffic)
    fig, axes = step_rows(rows)
    ax = axes["bytes"]
    for key, colour, style in (("bytes_sent", COMPUTE, "-"), ("bytes_received", COMM, "--"),
                               ("bytes_retransmitted", WAIT, "-")):
        if key in traffic:
            ax.plot(traffic["step"], np.asarray(traffic[key]) / 1024, style, color=colour,
                    lw=1.3, label=key.replace("_", " "))
    ax.set_ylabel("KiB per step")
    ax.legend(loc="upper right")
    ax.set_title("rank 0: gradient payload per step", loc="left")
    if "messages" in axes:
        for key, style in (("messages_sent", "-"), ("messages_received", "--")):
            if key in traffic:
                axes["messages"].plot(traffic["step"], traffic[key], style, lw=1.2,
                                      label=key.replace("_", " "))
        axes["messages"].set_ylabel("messages")
        axes["messages"].legend(loc="upper right")
    axes[rows[-1][0]].set_xlabel("step")
    return fig


@svg_figure
def layer_figure(layers: dict):
    """Per layer: its allreduce's mean time (blocked part darker, longest as a tick) and
    its bytes: the gradient per allreduce and, when counted, the run's payload."""
    wire = "wire_bytes" in layers
    fig, axes = pyplot().subplots(1, 2 + wire, figsize=(10.5, 3.2), squeeze=False,
                                  layout="constrained")
    x = np.arange(len(layers["layer"]))
    names = [f"layer {i}" for i in layers["layer"]]
    ax = axes[0, 0]
    ax.bar(x, 1e3 * np.asarray(layers["time_mean"]), color=COMM, label="mean time")
    ax.bar(x, 1e3 * np.asarray(layers["wait_mean"]), width=0.5, color=WAIT,
           label="of which blocked on messages")
    ax.plot(x, 1e3 * np.asarray(layers["time_max"]), "_", color="black", ms=18, mew=1.5,
            label="longest")
    ax.set_ylabel("ms per allreduce")
    ax.set_title("allreduce time per layer (all ranks, all steps)", loc="left")
    ax.legend(loc="upper right")
    panels = [("bytes", "gradient per allreduce", COMPUTE)]
    if wire:
        panels.append(("wire_bytes", "payload sent, whole run (traffic.json)", COMM))
    for ax, (key, title, colour) in zip(axes[0, 1:], panels):
        ax.bar(x, np.asarray(layers[key]) / 1024, color=colour)
        for xi, n in zip(x, layers[key]):
            ax.text(xi, n / 1024, human_bytes(n), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("KiB")
        ax.set_title(title, loc="left")
    for ax in axes[0]:
        ax.set_xticks(x, names)
    return fig


@svg_figure
def straggler_figure(strag: dict, straggler: int | None):
    """Per rank: arrived last (times), lateness when last, others blocked on it, its own
    waiting for the last arrival; the straggler diagnose names is drawn in red."""
    ranks = strag["rank"]
    colours = [WAIT if r == straggler else COMPUTE for r in ranks]
    panels = (("last_count", 1, f"arrived last (of {strag['collectives']} collectives)",
               "times"),
              ("late_mean", 1e3, "how late, when last (mean)", "ms"),
              ("blocked_on", 1, "others blocked on its messages", "s"),
              ("waited", 1, "it waited for the last arrival", "s"))
    fig, axes = pyplot().subplots(2, 2, figsize=(10.5, 4.6), layout="constrained")
    for ax, (key, scale, title, unit) in zip(axes.flat, panels):
        ax.bar(ranks, np.asarray(strag[key]) * scale, color=colours)
        ax.set_xticks(ranks, [f"rank {r}" for r in ranks])
        ax.set_ylabel(unit)
        ax.set_title(title, loc="left")
    return fig


@svg_figure
def divergence_figure(div: dict):
    """Layers x steps: how many different replicas of each layer the ranks hold (colour),
    messages counted as lost (x) and check warnings (triangles) where they happened."""
    layers = sorted(int(i) for i in div.get("groups", {})) or \
        sorted({e["layer"] for e in div["lost"] + div["checks"] if e["layer"] is not None})
    fig, axes = step_rows([("map", 0.9 + 0.45 * max(len(layers), 1))])
    ax = axes["map"]
    if div.get("groups"):
        grid = np.array([div["groups"][str(i)] for i in layers], dtype=float)
        steps = div["step"]
        top = max(int(div["ranks"] or grid.max()), 2)
        mesh = ax.pcolormesh(np.append(np.asarray(steps) - 0.5, steps[-1] + 0.5),
                             np.arange(len(layers) + 1) - 0.5, grid, vmin=0.5, vmax=top + 0.5,
                             cmap=pyplot().get_cmap("OrRd", top), edgecolors="face")
        bar = fig.colorbar(mesh, ax=ax, ticks=range(1, top + 1), pad=0.01)
        bar.set_label("different replicas")
    row = {layer: k for k, layer in enumerate(layers)}
    # lost messages drawn in the upper half of a layer's row, warnings in the lower half
    for key, kind, label, shift in (("lost", "lost (counted absent)", "message counted as lost",
                                     0.2), ("checks", "divergence warning", "check warning", -0.2)):
        points = [(e["step"], row[e["layer"]] + shift) for e in div[key] if e["layer"] in row]
        if points:
            ax.scatter(*zip(*points), s=60, zorder=3, label=f"{label} ({len(points)})",
                       **marker_style(kind))
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_ylim(-0.5, len(layers) - 0.5)
    ax.grid(False)
    ax.set_xlabel("step")
    ax.set_title("different replicas of each layer after each step", loc="left")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", bbox_to_anchor=(1, 1.0), ncol=2, frameon=False)
    return fig
