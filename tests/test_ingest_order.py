"""A batch sent again, or out of order, never turns the raw store back: a delivered row older than the stored
row of its key (its time, state changes and `updated_at`: `TableSpec.changed_at`) is kept out and counted."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from core.raw_store import RawStore
from pipelines.ingest import ingest
from testkit.daily import split_day

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "platform"
DAY = pd.Timestamp("2025-10-15")


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("order")
    split_day(SAMPLE, DAY, root / "base", root / "day", merchants=150)
    return {"base": root / "base", "day": root / "day"}


def _updates(days: dict[str, Path], table: str, key: str) -> int:
    """Rows of the day's batch that are later states of rows of the base."""
    return duckdb.connect().execute(
        f"SELECT count(*) FROM '{days['day']}/{table}.parquet' d JOIN '{days['base']}/{table}.parquet' b USING ({key})"
    ).fetchone()[0]


def test_the_base_sent_again_after_the_day_changes_nothing_and_says_what_it_kept_out(days, settings):
    ingest(days["base"], settings)
    after_day = ingest(days["day"], settings)
    updates = {"orders": _updates(days, "orders", "order_id"), "receivables": _updates(days, "receivables",
                                                                                        "receivable_id")}
    assert updates["orders"] > 0 and updates["receivables"] > 0  # delivered, refunded, paid that day

    again = ingest(days["base"], settings)  # e.g. yesterday's export re-sent by a retry
    assert again.snapshot_id == after_day.snapshot_id  # nothing went back to its state before the day
    assert {t: again.stale.get(t) for t in updates} == updates
    assert (f"orders: {again.rows['orders']:,} rows in batch, {updates['orders']:,} older than the stored rows "
            "of their keys kept out (updated_at), unchanged") in again.describe()


def test_an_older_row_that_would_move_to_another_month_is_kept_out_and_a_same_time_correction_is_taken(
        days, settings, tmp_path):
    ingest(days["base"], settings)
    ingest(days["day"], settings)
    con = duckdb.connect()
    (order_id,) = con.execute(
        f"SELECT order_id FROM '{days['day']}/orders.parquet' WHERE order_id IN "
        f"(SELECT order_id FROM '{days['base']}/orders.parquet') ORDER BY order_id LIMIT 1").fetchone()
    before = RawStore(settings.path("raw_store")).manifest()["snapshot_id"]

    # Its base state, with its order time moved 40 days back (another month's partition): older than stored.
    (tmp_path / "stale").mkdir()
    con.execute(f"""COPY (SELECT * REPLACE (ordered_at - INTERVAL 40 DAY AS ordered_at)
        FROM '{days['base']}/orders.parquet' WHERE order_id = {order_id!r})
        TO '{tmp_path / "stale" / "orders.parquet"}' (FORMAT parquet)""")
    stale = ingest(tmp_path / "stale", settings)
    assert stale.stale == {"orders": 1}
    assert stale.snapshot_id == before
    stored = RawStore(settings.path("raw_store")).dataset("orders").to_table(columns=["order_id"]).to_pandas()
    assert (stored["order_id"] == order_id).sum() == 1  # not in two months

    # The stored state itself, with another amount and the same times: a correction, taken.
    (tmp_path / "fix").mkdir()
    con.execute(f"""COPY (SELECT * REPLACE (amount + 1 AS amount) FROM '{days['day']}/orders.parquet'
        WHERE order_id = {order_id!r}) TO '{tmp_path / "fix" / "orders.parquet"}' (FORMAT parquet)""")
    fixed = ingest(tmp_path / "fix", settings)
    assert fixed.stale == {} and fixed.snapshot_id != before
