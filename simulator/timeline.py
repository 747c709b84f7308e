"""The platform as its database holds it at an instant, and day by day.

The generators write each row's whole life: its facts and the time of every later state change (an order
shipped, delivered, refunded, rated, settled; a receivable paid; goods released), even those after the
window end. `as_of` is the one place that turns lives into what the platform knows at an instant: the rows
written before it, the state changes that happened before it, the status they imply and `updated_at`. The
full history is the lives as of the window end; a daily run is that history as of a first day, then, for
each day, the rows written or changed that day as they stand at its end (`day_changes`). Upserting the days
in order on the first day's state gives the full history back, row for row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.schemas import ORDER_STATUSES, TABLES, TIMESTAMP, UPDATED_AT
from simulator.arrays import DAY, strings

ORDER_STATUS_BY_EVENT = (
    ("cancelled", "cancelled_at"),
    ("refunded", "refunded_at"),
    ("completed", "settled_at"),
    ("delivered", "delivered_at"),
    ("shipped", "shipped_at"),
)
"""An order's status is that of its first event in this list that has happened; `paid` before any."""
SET_WITH = {"orders": {"rating": "rated_at"}}
"""Columns set together with a state change (the rating comes with `rated_at`)."""


def as_of(name: str, lives: pa.Table, at: int) -> pa.Table:
    """Table `name` as the platform's database holds it at instant `at` (epoch seconds), in its exact schema.

    `lives` may be the generators' lives or any later state of the same rows (status and `updated_at`,
    when present, are recomputed): the state at an instant depends only on what happened before it.
    """
    spec = TABLES[name]
    cut = pa.scalar(at * 1_000_000, TIMESTAMP)
    written = pc.less(lives[spec.time_column], cut)
    rows = lives if pc.all(written).as_py() else lives.filter(written)  # no copy when every row stays
    if not spec.state_columns:
        return rows.select([c.name for c in spec.columns])
    columns = {column: rows[column] for column in rows.column_names}
    for state in spec.state_columns:
        columns[state] = pc.if_else(pc.less(rows[state], cut), rows[state], pa.scalar(None, TIMESTAMP))
    for column, state in SET_WITH.get(name, {}).items():
        columns[column] = pc.if_else(columns[state].is_valid(), rows[column], pa.scalar(None, rows[column].type))
    if name == "orders":
        happened = [columns[state].is_valid().to_numpy(zero_copy_only=False) for _, state in ORDER_STATUS_BY_EVENT]
        codes = [ORDER_STATUSES.index(status) for status, _ in ORDER_STATUS_BY_EVENT]
        columns["status"] = strings(np.select(happened, codes, ORDER_STATUSES.index("paid")), ORDER_STATUSES)
    columns[UPDATED_AT] = pc.max_element_wise(
        rows[spec.time_column], *(columns[s] for s in spec.state_columns), skip_nulls=True
    )
    return pa.table([columns[c.name] for c in spec.columns], schema=spec.arrow_schema)


def day_changes(name: str, history: pa.Table, first_day: int, end: int) -> list[tuple[int, pa.Table]]:
    """(day, rows) for each day from `first_day` to `end` (epoch seconds, midnights): the rows of `history`
    (the table as of `end`) written or changed that day, each as it stands at the day's end.

    A row's days are read off its time and state-change columns once, so all the days together cost a pass
    over the rows they hold, however many days there are.
    """
    spec = TABLES[name]
    n_days = (end - first_day) // DAY
    touched = []
    for column in (spec.time_column, *spec.state_columns):
        values = history[column]
        day = (pc.fill_null(values.cast(pa.int64()), 0).to_numpy() // 1_000_000 - first_day) // DAY
        on = np.flatnonzero(values.is_valid().to_numpy(zero_copy_only=False) & (day >= 0) & (day < n_days))
        touched.append(day[on] * len(history) + on)
    pairs = np.unique(np.concatenate(touched))  # (day, row), by day then row; a row once a day
    day, row = pairs // max(len(history), 1), pairs % max(len(history), 1)
    bounds = np.searchsorted(day, np.arange(n_days + 1))
    return [
        (first_day + i * DAY, as_of(name, history.take(row[bounds[i]:bounds[i + 1]]), first_day + (i + 1) * DAY))
        for i in range(n_days)
    ]
