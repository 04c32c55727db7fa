"""One self-contained HTML page: inline CSS, figures as SVG data URIs, no script that runs,
nothing fetched from the network.

Next to each figure the page embeds the series it was drawn from, as
``<script type="application/json" id="data-KEY">`` (browsers do not run it): the numbers
on the page can be checked against the run's files by any program that parses HTML.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; }
main { max-width: 1120px; margin: 0 auto; padding: 20px 28px 48px; background: #fff; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 17px; margin: 30px 0 6px; padding-top: 10px; border-top: 1px solid #d0d7de; }
p.meta { color: #57606a; margin: 0 0 14px; }
p.caption { color: #424a53; margin: 4px 0 8px; max-width: 100ch; }
p.absent { color: #6e7781; font-style: italic; background: #f6f8fa; padding: 8px 12px;
           border-left: 3px solid #d0d7de; }
p.alert { background: #fff1f0; border-left: 3px solid #cf222e; padding: 8px 12px; }
img.figure { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #d8dee4; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 10px 12px; white-space: pre-wrap; font-size: 12.5px; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
"""


# The page may use nothing but itself: a browser refuses (and reports) anything else.
NO_NETWORK = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Section:
    """One part of the page: a heading, a caption, then a figure or the reason it is
    absent, then any extra HTML; ``data`` is embedded as ``data-{key}``."""

    key: str
    title: str
    caption: str = ""
    svg: str | None = None
    absent: str | None = None
    data: Any = None
    extra: str = ""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def plain(value: Any) -> Any:
    """``value`` with NaN/Inf as None and tuples as lists: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def data_block(key: str, data: Any) -> str:
    """The series as an inert JSON script block (``</`` escaped so it cannot end it)."""
    text = json.dumps(plain(data), separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="data-{esc(key)}">{text}</script>'


def figure_img(svg: str, alt: str) -> str:
    """An <img> holding the SVG as a data URI: each figure keeps its own ids and fonts."""
    encoded = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img class="figure" alt="{esc(alt)}" src="data:image/svg+xml;base64,{encoded}">'


def table(headers: list[str] | None, rows: list[list[Any]], key: str | None = None) -> str:
    """A plain table (no header row when ``headers`` is None); cells are escaped text.
    ``key`` gives it the id ``table-{key}``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers or [])
    head = f"<thead><tr>{head}</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    ident = f' id="table-{esc(key)}"' if key else ""
    return f"<table{ident}>{head}<tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    """A table cell; numbers (and "n/a" in their columns) are right-aligned."""
    numeric = isinstance(value, (int, float)) or _looks_numeric(str(value))
    return f'<td class="num">{esc(value)}</td>' if numeric else f"<td>{esc(value)}</td>"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "n/a"
    return True


def render_section(s: Section) -> str:
    parts = [f'<section id="{esc(s.key)}"><h2>{esc(s.title)}</h2>']
    if s.caption:
        parts.append(f'<p class="caption">{s.caption}</p>')
    if s.svg is not None:
        parts.append(figure_img(s.svg, s.title))
    elif s.absent:
        parts.append(f'<p class="absent">{esc(s.absent)}</p>')
    parts.append(s.extra)
    if s.data is not None:
        parts.append(data_block(s.key, s.data))
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, meta: str, sections: list[Section]) -> str:
    """The whole document: ``meta`` (escaped) under the title, a navigation line to every
    section, then the sections."""
    nav = " ".join(f'<a href="#{esc(s.key)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(render_section(s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{NO_NETWORK}">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body><main>\n"
            f"<h1>{esc(title)}</h1>\n<p class=\"meta\">{esc(meta)}</p>\n<nav>{nav}</nav>\n"
            f"{body}\n</main></body></html>\n")
