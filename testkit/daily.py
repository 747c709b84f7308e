"""Daily increments cut from a whole simulated platform, for the refresh tests and benchmark (until the
simulator writes its own): the base is the platform as it was known before day D, the increment what the
day's pull delivers.

- base: the rows whose own time is before D, with every later state change (a shipment, refund, payment,
  release... any non-scheduled time at or after D) not known yet, so empty;
- increment: the rows of day D, and the older rows whose state changed during day D, re-delivered whole
  with what is known at the end of the day (changes after it still empty).
Scheduled times (a promised delivery, a due date) are known from the start and kept.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from core.batch import locate_tables
from core.schemas import TABLES
from core.sql import fetch_one


def _reader(path: Path) -> str:
    return f"read_parquet('{path}/**/*.parquet')" if path.is_dir() else f"read_parquet('{path}')"


def split_day(source: Path, day: pd.Timestamp | str, base: Path, increment: Path,
              merchants: int | None = None) -> dict[str, dict[str, int]]:
    """Write the base (before `day`) and the increment (`day`) of a platform batch folder as batch folders;
    `merchants` keeps only the first N merchants (smaller tests). Rows per table and part."""
    start = pd.Timestamp(day).normalize()
    end = start + pd.Timedelta(days=1)
    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = false")
    counts: dict[str, dict[str, int]] = {}
    paths = locate_tables(source)
    keep = ""
    if merchants is not None:
        con.execute(f"CREATE TEMP TABLE kept AS SELECT merchant_id FROM {_reader(paths['merchants'])} "
                    f"ORDER BY merchant_id LIMIT {int(merchants)}")
        keep = " AND merchant_id IN (SELECT merchant_id FROM kept)"
    for name, path in paths.items():
        spec = TABLES[name]
        present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {_reader(path)}").fetchall()}
        states = [c for c in spec.timestamp_columns  # optional columns (updated_at) may be absent
                  if c != spec.time_column and not spec.column_index[c].scheduled and c in present]

        def known(before: pd.Timestamp, states: list[str] = states) -> str:
            if not states:
                return "*"
            masked = ", ".join(f"CASE WHEN {c} < TIMESTAMP '{before}' THEN {c} END AS {c}" for c in states)
            return f"* REPLACE ({masked})"

        changed = " OR ".join(f"({c} >= TIMESTAMP '{start}' AND {c} < TIMESTAMP '{end}')" for c in states) or "false"
        time = spec.time_column
        parts = {
            base: f"SELECT {known(start)} FROM {_reader(path)} WHERE {time} < TIMESTAMP '{start}'{keep}",
            increment: (f"SELECT {known(end)} FROM {_reader(path)} WHERE ({time} >= TIMESTAMP '{start}' AND "
                        f"{time} < TIMESTAMP '{end}' OR {time} < TIMESTAMP '{start}' AND ({changed})){keep}"),
        }
        counts[name] = {}
        for folder, sql in parts.items():
            folder.mkdir(parents=True, exist_ok=True)
            con.execute(f"COPY ({sql}) TO '{folder / name}.parquet' (FORMAT parquet)")
            (counts[name][folder.name],) = fetch_one(con, f"SELECT count(*) FROM '{folder / name}.parquet'")
    return counts
