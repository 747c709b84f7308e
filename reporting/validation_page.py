"""The validation page of a batch: one self-contained HTML page, rendered from the same failures as the
error message (GX's Data Docs load their CSS and scripts from CDNs and show a blank page offline)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd

from core.rules import Failure
from core.validation import TableChecked
from reporting.html import KeyFigures, Paragraph, Section, Table, write_page


def write_validation_page(folder: Path, failures: Sequence[Failure], tables: Sequence[TableChecked],
                          now: datetime) -> Path:
    """`folder/index.html` for a batch checked at `now`; returns its path."""
    return write_page(
        folder / "index.html",
        f"Validation of the batch checked {now:%Y-%m-%d %H:%M}",
        validation_sections(failures, tables, now),
        subtitle="Every rule of the data model (core/schemas.py), checked with Great Expectations",
    )


def validation_sections(
    failures: Sequence[Failure], tables: Sequence[TableChecked], now: datetime
) -> list[Section]:
    """The validation page of a batch: verdict, one row per failed rule (table, column, rule, failing rows
    and examples; what failed for a table-level rule), then every table checked."""
    verdict = "rejected: nothing was loaded" if failures else "passed"
    summary = KeyFigures(
        {
            "batch": verdict,
            "tables checked": len(tables),
            "rules checked": sum(t.rules for t in tables),
            "rules failed": len(failures),
            "checked at": f"{now:%Y-%m-%d %H:%M:%S}",
        }
    )
    sections = [Section("Verdict", [summary])]
    if failures:
        rows = pd.DataFrame(
            {
                "table": [f.table for f in failures],
                "column": [", ".join(f.columns) or "(whole table)" for f in failures],
                "rule": [f.expectation for f in failures],
                "failing rows": [f.failing_rows for f in failures],
                "of rows": [f.rows for f in failures],
                "examples": [", ".join(f.examples) for f in failures],
                "what failed": ["" if f.failing_rows is not None else f.detail for f in failures],
            }
        )
        if not rows["what failed"].any():
            rows = rows.drop(columns="what failed")
        sections.append(
            Section(
                "Failed rules",
                [
                    Paragraph(
                        "Fix these in the source data and send the batch again; the first failure of a "
                        "column is its cause (checks a missing or mistyped column makes meaningless "
                        "are left out)."
                    ),
                    Table(rows, max_rows=len(rows)),
                ],
            )
        )
    tables_frame = pd.DataFrame([vars(t) for t in tables]).rename(columns={"failed": "rules failed"})
    sections.append(Section("Tables checked", [Table(tables_frame, max_rows=len(tables_frame))]))
    return sections
