"""``mpitrain simulate --plot FILE.png``: step time and traffic against P (and the check).

matplotlib is optional (the ``bench`` extra): without it the plot is skipped with a note.
"""
from __future__ import annotations

import sys

STYLES = {"native": ("o", "-"), "ring": ("s", "--"), "recursive_doubling": ("^", "-."),
          "tree": ("x", ":")}


def plot(report: dict, path: str) -> None:
    """Write the predictions in ``report`` (``simulate --json``'s content) to ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"mpitrain simulate: matplotlib is not installed, so no plot was written to {path} "
              f"(pip install matplotlib, or the 'bench' extra)", file=sys.stderr)
        return
    checks = report.get("check_points")
    ncol = 3 if checks else 2
    fig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol, 4.2))
    _plot_predictions(axes[0], axes[1], report["predictions"])
    if checks:
        _plot_check(axes[2], checks)
    w = "-".join(map(str, report["widths"]))
    fig.suptitle(f"mpitrain simulate: MLP {w}, batch {report['batch']}/rank; {report['source']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"# plot written to {path}")


def _plot_predictions(step_ax, traffic_ax, preds: list[dict]) -> None:
    """Step time (with the compute-only line) and traffic per rank, per algorithm, vs P."""
    import matplotlib.ticker
    for a in dict.fromkeys(r["algorithm"] for r in preds):
        rs = [r for r in preds if r["algorithm"] == a]
        ps = [r["ranks"] for r in rs]
        mk, ls = STYLES.get(a, ("o", "-"))
        step_ax.plot(ps, [r["step_s"] * 1e3 for r in rs], marker=mk, ls=ls, ms=4, label=a)
        traffic_ax.plot(ps, [r["traffic_bytes"] / 2**20 for r in rs], marker=mk, ls=ls, ms=4,
                        label=a)
    compute = preds[0]["compute_s"] * 1e3
    step_ax.axhline(compute, color="gray", ls=":", lw=1, label="compute only")
    for ax, title, yl in ((step_ax, "predicted step time", "ms per step"),
                          (traffic_ax, "traffic per rank per step (busiest rank)", "MiB sent")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks P")
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)


def _plot_check(ax, checks: dict) -> None:
    """Measured allreduce times (dots) against the model's (lines), per algorithm and P."""
    for key, pts in checks.items():
        pts = sorted(pts)
        line, = ax.plot([n for n, _, _ in pts], [t * 1e6 for _, t, _ in pts], "o", ms=3,
                        label=f"{key} measured")
        ax.plot([n for n, _, _ in pts], [pr * 1e6 for _, _, pr in pts], "-",
                color=line.get_color(), lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message bytes")
    ax.set_ylabel("allreduce time (us)")
    ax.set_title("check: measured (dots) vs model (lines)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
