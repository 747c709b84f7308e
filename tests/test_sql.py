"""DuckDB connections: single-row results read to the end."""

from __future__ import annotations

import pandas as pd

from core.sql import duckdb_connect, fetch_one
from tests.conftest import REPO


def test_a_single_row_leaves_the_connection_free_for_more_work():
    """`fetchone()` leaves a result unfinished and DuckDB 2 then refuses a `register` on the connection."""
    con = duckdb_connect()
    assert fetch_one(con, "SELECT max(range), ? FROM range(3_000_000)", [7]) == (2_999_999, 7)
    con.register("more", pd.DataFrame({"a": [1]}))  # ResourceInUseException after a fetchone()
    assert con.execute("SELECT a FROM more").fetchall() == [(1,)]


def test_no_single_row_is_left_unfinished_in_the_code():
    packages = ("core", "features", "models", "explanation", "credit", "reporting", "serving", "pipelines",
                "simulator", "testkit", "benchmarks")
    found = [f"{path.relative_to(REPO)}:{n}" for package in packages for path in sorted((REPO / package).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if ".fetchone()" in line and "cursor" not in line]  # a PostgreSQL cursor's fetchone is fine
    assert not found, f"use core.sql.fetch_one: {found}"
