"""One self-contained HTML page from titled sections: text, key figures, tables and images.

Reports go to risk officers and auditors by e-mail and on paper, so the page carries everything inline
(images as base64 PNG, CSS in the head), prints cleanly, and needs no server. Every report of the
project (strategy analytics, SHAP risk report, ...) renders through `render_page`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # pages without images (the validation page) need no matplotlib
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class KeyFigures:
    """A row of headline numbers (already formatted or plain numbers)."""

    values: Mapping[str, str | float | int]


class Status(Enum):
    """A traffic-light cell: a table value of this type renders as a coloured badge."""

    GREEN = "green"
    AMBER = "amber"
    RED = "red"
    NOT_ASSESSED = "not assessed"


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    caption: str = ""
    formats: Mapping[str, str] = field(default_factory=dict)
    """Per-column format spec, e.g. {"approval_rate": "{:.1%}"}; other numbers get a readable default."""
    max_rows: int = 200
    fold_after: int | None = None
    """Show this many rows, and the whole table (up to `max_rows`) folded in a <details> below: a reader
    sees the top of a long ranking without scrolling past it."""


@dataclass(frozen=True)
class Image:
    png: bytes
    caption: str = ""

    @classmethod
    def from_figure(cls, figure: Figure, caption: str = "", dpi: int = 110) -> Image:
        """Build plots with `matplotlib.figure.Figure` (no pyplot: no global state, no GUI backend)."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        return cls(buffer.getvalue(), caption)


@dataclass(frozen=True)
class Columns:
    """Columns side by side, each a block or a sequence of blocks stacked (they wrap below each other on a
    narrow page or on paper)."""

    columns: Sequence[
        Paragraph | KeyFigures | Table | Image | Sequence[Paragraph | KeyFigures | Table | Image]
    ]


Block = Paragraph | KeyFigures | Table | Image | Columns


@dataclass(frozen=True)
class Section:
    title: str
    blocks: Sequence[Block]


CSS = """
:root { --ink: #1d2330; --muted: #5d6677; --line: #dde1e8; --accent: #1f5fbf; --zebra: #f6f8fb; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1080px; padding: 2.5rem 2rem 4rem; color: var(--ink);
       font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 1.5rem; }
h1 { font-size: 1.8rem; margin: 0 0 .25rem; letter-spacing: -.01em; }
header p { color: var(--muted); margin: 0 0 1rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 .8rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); }
nav ol { display: flex; flex-wrap: wrap; gap: .2rem 1.1rem; margin: 0 0 1rem; padding: 0; list-style: none;
         font-size: .85rem; counter-reset: s; }
nav li::before { counter-increment: s; content: counter(s) ". "; color: var(--muted); }
nav a { color: var(--accent); text-decoration: none; }
.figures { display: flex; flex-wrap: wrap; gap: .6rem; margin: .8rem 0; }
.figure { border: 1px solid var(--line); border-radius: 6px; padding: .45rem .8rem; min-width: 8rem; }
.figure b { display: block; font-size: 1.25rem; font-variant-numeric: tabular-nums; }
.columns { display: flex; flex-wrap: wrap; gap: 0 2rem; align-items: flex-start; }
.columns > div { flex: 1 1 20rem; min-width: 0; }
.columns table { margin-top: .3rem; font-size: .84rem; }
.columns th, .columns td { padding: .22rem .55rem; }
.badge { display: inline-block; white-space: nowrap; padding: 0 .5rem; border-radius: 9px;
         font-weight: 600; font-size: .8rem; }
.badge.green { background: #d7f0dd; color: #14612b; } .badge.amber { background: #fde9c4; color: #7a4a00; }
.badge.red { background: #f8d3d0; color: #8f1d14; } .badge.not { background: #e6e8ec; color: var(--muted); }
details { margin: -.8rem 0 1.4rem; } details > summary { cursor: pointer; color: var(--accent); }
.figure span { color: var(--muted); font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; }
table { border-collapse: collapse; margin: .8rem 0 1.4rem; font-size: .88rem; width: auto; }
caption { caption-side: top; text-align: left; color: var(--muted); padding-bottom: .3rem; }
th, td { padding: .3rem .7rem; border-bottom: 1px solid var(--line); }
th { text-align: left; background: #eef2f8; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: var(--zebra); }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; }
figcaption, .note { color: var(--muted); font-size: .85rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; border-top: 1px solid var(--line); }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  @page { margin: 16mm 14mm; }
  nav { display: none; }
  h2 { break-after: avoid; }
  table, figure, .figures { break-inside: avoid; }
  details > table { display: none; }
  a { color: inherit; }
}
"""


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{value:,.0f}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _cell(value: object, fmt: str | None) -> tuple[str, bool]:
    """Text of one cell and whether it is numeric (right-aligned)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–", True
    if isinstance(value, Status):
        return f'<span class="badge {value.value.split()[0]}">{html.escape(value.value)}</span>', False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (fmt.format(value) if fmt else _number(value)), True
    return html.escape(str(value)), False


def _rows(block: Table, frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):  # display only: a report table has at most max_rows rows
        cells = []
        for column, value in zip(frame.columns, record):
            text, numeric = _cell(
                value.item() if hasattr(value, "item") else value, block.formats.get(column)
            )
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"


def _table(block: Table) -> str:
    frame = block.frame.head(block.max_rows)
    more = len(block.frame) - len(frame)
    note = f'<p class="note">{more:,} more rows not shown.</p>' if more > 0 else ""
    caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
    if block.fold_after is None or len(frame) <= block.fold_after:
        return f"<table>{caption}{_rows(block, frame)}</table>{note}"
    top = f"<table>{caption}{_rows(block, frame.head(block.fold_after))}</table>"
    return (
        f"{top}<details><summary>All {len(frame):,} rows of this table</summary>"
        f"<table>{_rows(block, frame)}</table>{note}</details>"
    )


def _key_figures(block: KeyFigures) -> str:
    items = "".join(
        f'<div class="figure"><b>{html.escape(v if isinstance(v, str) else _number(v))}</b>'
        f"<span>{html.escape(k)}</span></div>"
        for k, v in block.values.items()
    )
    return f'<div class="figures">{items}</div>'


def _image(block: Image) -> str:
    data = base64.b64encode(block.png).decode("ascii")
    caption = f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
    return f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">{caption}</figure>'


def _columns(block: Columns) -> str:
    stacks = [column if isinstance(column, Sequence) else [column] for column in block.columns]
    inner = ("".join(_RENDER[type(b)](b) for b in stack) for stack in stacks)
    return '<div class="columns">' + "".join(f"<div>{part}</div>" for part in inner) + "</div>"


_RENDER: dict[type, Callable[..., str]] = {
    Paragraph: lambda b: f"<p>{html.escape(b.text)}</p>",
    KeyFigures: _key_figures,
    Table: _table,
    Image: _image,
    Columns: _columns,
}


def render_page(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The whole page as one HTML string; all text is escaped, so data can hold any characters."""
    anchors = [f"s{i}" for i in range(len(sections))]
    toc = "".join(f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for a, s in zip(anchors, sections))
    body = "".join(
        f'<section id="{a}"><h2>{html.escape(s.title)}</h2>{"".join(_RENDER[type(b)](b) for b in s.blocks)}</section>'
        for a, s in zip(anchors, sections)
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<nav><ol>{toc}</ol></nav>{body}<footer><p>Generated {generated} by scfrisk.</p></footer></body></html>\n"
    )


def write_page(path: Path | str, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(title, sections, subtitle), encoding="utf-8")
    return path
