"""A run's summary as text: the report's terminal lines and table, compare's table.

Works on :func:`mpitrain.tools.report_data.summary` dicts; a figure that a run does not
have is shown as "n/a".
"""
from __future__ import annotations

from typing import Any

NA = "n/a"


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return NA
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def split_text(s: dict) -> str:
    """'compute 12%, communication 80%, waiting 8%' of rank 0's time (n/a without steps)."""
    t = s["time"]
    if not t["total"]:
        return NA
    return ", ".join(f"{name} {100 * t[key] / t['total']:.0f}%" for name, key in
                     (("compute", "compute"), ("communication", "comm"), ("waiting", "wait")))


def faults_text(s: dict) -> str:
    """'32 injected (17 drop, 6 corrupt)' or 'none injected'."""
    if not s["faults_total"]:
        return "none injected"
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(s["faults"].items(),
                                                          key=lambda kv: -kv[1]))
    return f"{s['faults_total']} injected ({kinds})"


def status_text(s: dict) -> str:
    if s["finished"]:
        return "finished"
    return f"stopped after step {s['last_step']}: no model.npz"


def run_lines(s: dict, overlap: float | None, error: str | None) -> list[tuple[str, str]]:
    """(label, text) lines that describe one run, for the terminal and the page."""
    final = f"loss {number(s['loss'])}, accuracy {number(s['accuracy'])}"
    if s["val_loss"] is not None or s["val_accuracy"] is not None:
        final += (f"; validation loss {number(s['val_loss'])}, accuracy "
                  f"{number(s['val_accuracy'])} (epoch {s['epoch']})")
    time = f"{s['time']['total']:.2f} s on rank 0: {split_text(s)}"
    if overlap is not None:
        time += f"; overlap {100 * overlap:.0f}%"
    ranks = "? ranks" if s["ranks"] is None else \
        f"{s['ranks']} rank" + ("s" if s["ranks"] != 1 else "")
    lines = [("run", f"{s['job']}: {ranks}, {s['algorithm'] or '?'} allreduce, "
                     f"{s['delivery'] or '?'} delivery"),
             ("steps", f"{s['steps']} ({status_text(s)})"), ("final", final), ("time", time),
             ("faults", f"{faults_text(s)}; {number(s['retransmissions'])} retransmissions; "
                        f"{s['lost']} messages lost")]
    if error:
        lines.append(("error", error))
    if s["skipped_lines"]:
        lines.append(("note", f"{s['skipped_lines']} line(s) cut short were skipped"))
    return lines


COMPARE_HEADERS = ["run", "ranks", "algorithm", "delivery", "steps", "final loss", "val loss",
                   "val accuracy", "steps/s", "compute %", "comm %", "wait %", "faults",
                   "retransmissions", "lost"]


def compare_row(label: str, s: dict) -> list[str]:
    """One row of compare's table (headers: :data:`COMPARE_HEADERS`)."""
    t = s["time"]
    shares = [f"{100 * t[k] / t['total']:.0f}" if t["total"] else NA
              for k in ("compute", "comm", "wait")]
    steps = str(s["steps"]) + ("" if s["finished"] else " (stopped)")
    return [label, number(s["ranks"]), s["algorithm"] or NA, s["delivery"] or NA, steps,
            number(s["loss"]), number(s["val_loss"]), number(s["val_accuracy"]),
            number(s["steps_per_s"], 1), *shares, str(s["faults_total"]),
            number(s["retransmissions"]), number(s["lost"])]


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned for a terminal: text left, numbers right."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
