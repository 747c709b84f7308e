"""The PostgreSQL source on a real throwaway server: exact round trip of the data model, watermarks that
catch late commits and changed rows, chunked reads, and errors a user can act on."""

from __future__ import annotations

import sys
from datetime import timedelta

import adbc_driver_postgresql.dbapi
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from core.postgres import PostgresError, load
from core.postgres_source import PostgresSource
from core.schemas import TABLES
from pipelines.cli import run
from simulator import SimulationConfig, simulate_platform
from tests.conftest import SAMPLE
from tests.sample_slice import changed_at, latest_change, sample_slice

MERCHANTS = 60


@pytest.fixture(scope="module")
def platform() -> dict[str, pa.Table]:
    if not (SAMPLE / "orders").is_dir():
        pytest.skip("data_samples/platform is not there")
    return sample_slice(MERCHANTS)


def pulled(source: PostgresSource, name: str) -> pa.Table:
    spec = TABLES[name]
    batches = list(source.batches(name))
    table = pa.Table.from_batches(batches) if batches else spec.arrow_schema.empty_table()
    return table.cast(spec.arrow_schema).sort_by(spec.key)


def execute(url: str, *statements: str) -> None:
    with adbc_driver_postgresql.dbapi.connect(url) as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
        connection.commit()


def test_a_full_pull_returns_the_loaded_tables_exactly(database, platform):
    loaded = load(database, {name: table.to_batches(max_chunksize=5000) for name, table in platform.items()})
    assert loaded == {name: table.num_rows for name, table in platform.items()}
    with PostgresSource(database) as source:
        assert source.tables() == list(TABLES)
        for name, table in platform.items():
            assert pulled(source, name).equals(table.sort_by(TABLES[name].key)), name
        state = source.state()
    assert state["postgresql"]["watermarks"]["orders"] == latest_change(platform["orders"], "orders").isoformat()
    assert set(state["postgresql"]["watermarks"]) == set(TABLES)


def test_loading_is_an_upsert_by_key(database, platform):
    merchants = platform["merchants"]
    load(database, {"merchants": [merchants.to_batches()[0]]})
    changed = merchants.slice(0, 3).set_column(2, "category", pa.array(["toys"] * 3))
    load(database, {"merchants": changed.to_batches()})
    with PostgresSource(database) as source:
        stored = pulled(source, "merchants")
    assert stored.num_rows == merchants.num_rows
    assert stored.filter(pc.is_in(stored["merchant_id"], changed["merchant_id"]))["category"].to_pylist() == \
        ["toys"] * 3


def test_a_second_pull_reads_new_and_changed_rows_only(database, platform):
    load(database, {name: table.to_batches() for name, table in platform.items()})
    with PostgresSource(database) as first:
        for name in TABLES:
            pulled(first, name)
        state = first.state()
    mark = latest_change(platform["orders"], "orders")
    later = mark + timedelta(days=1)
    old = platform["orders"].sort_by("ordered_at").slice(0, 1).to_pylist()[0]
    refunded = old | {"status": "refunded", "refunded_at": later, "updated_at": later}
    new = [old | {"order_id": 10**12 + i, "ordered_at": later, "updated_at": None} for i in range(2)]
    changes = pa.Table.from_pylist([refunded, *new], TABLES["orders"].arrow_schema)
    load(database, {"orders": changes.to_batches()})
    with PostgresSource(database, state) as second:
        orders = pulled(second, "orders")
        window = mark - second.overlap
        merchants = pulled(second, "merchants")
        assert second.state()["postgresql"]["watermarks"]["orders"] == later.isoformat()
    # The changed old order, the new ones, and the rows of the last hour before the watermark again.
    overlap = platform["orders"].filter(pc.greater_equal(changed_at(platform["orders"], "orders"), window))
    assert orders["order_id"].to_pylist() == sorted([old["order_id"], 10**12, 10**12 + 1,
                                                      *overlap["order_id"].to_pylist()])
    assert orders.filter(pc.field("order_id") == old["order_id"])["status"].to_pylist() == ["refunded"]
    since = latest_change(platform["merchants"], "merchants") - second.overlap
    assert merchants.num_rows == platform["merchants"].filter(pc.field("onboarded_at") >= since).num_rows


@pytest.mark.parametrize("overlap, seen", [(timedelta(hours=1), True), (timedelta(0), False)])
def test_a_row_committed_after_a_pull_with_an_earlier_time_is_caught_by_the_overlap(database, platform,
                                                                                   overlap, seen):
    load(database, {name: table.to_batches() for name, table in platform.items()})
    with PostgresSource(database, overlap=overlap) as first:
        state = first.state()
    mark = latest_change(platform["orders"], "orders")
    late = {"merchant_id": platform["orders"]["merchant_id"][0], "ordered_at": mark - timedelta(minutes=10)}
    writer = adbc_driver_postgresql.dbapi.connect(database)  # a long transaction, open across the next pull
    with writer.cursor() as cursor:
        cursor.execute("INSERT INTO orders (order_id, merchant_id, buyer_id, ordered_at, amount, status, "
                       f"promised_delivery_at) VALUES (1000000000000, '{late['merchant_id']}', 1, "
                       f"TIMESTAMP '{late['ordered_at']}', 10, 'paid', TIMESTAMP '{late['ordered_at']}')")
        with PostgresSource(database, state, overlap=overlap) as during:
            assert 10**12 not in pulled(during, "orders")["order_id"].to_pylist()  # not committed yet
            writer.commit()
            assert 10**12 not in pulled(during, "orders")["order_id"].to_pylist()  # the pull's snapshot
            state = during.state()
    writer.close()
    assert state["postgresql"]["watermarks"]["orders"] == mark.isoformat()
    with PostgresSource(database, state, overlap=overlap) as after:
        assert (10**12 in pulled(after, "orders")["order_id"].to_pylist()) is seen


def test_tables_stream_in_chunks(database, platform):
    load(database, {"orders": platform["orders"].to_batches()})
    with PostgresSource(database, batch_bytes=256 << 10) as source:
        batches = list(source.batches("orders"))
    assert len(batches) > 5
    assert max(b.nbytes for b in batches) < 4 * (256 << 10)
    assert sum(b.num_rows for b in batches) == platform["orders"].num_rows


def test_money_stored_as_numeric_is_read_as_float(database, platform):
    load(database, {name: table.slice(0, 10).to_batches() for name, table in platform.items()})
    execute(database, "ALTER TABLE orders ALTER COLUMN amount TYPE numeric(14, 2)")
    with PostgresSource(database) as source:
        orders = pulled(source, "orders")
    assert orders["amount"].type == pa.float64()
    expected = pc.round(platform["orders"].slice(0, 10).sort_by("order_id")["amount"], 2)
    assert orders["amount"].to_pylist() == expected.to_pylist()


def test_a_missing_table_or_column_is_one_error_naming_it(database, platform):
    load(database, {name: table.slice(0, 10).to_batches() for name, table in platform.items()})
    execute(database, "ALTER TABLE orders DROP COLUMN amount", "ALTER TABLE orders DROP COLUMN updated_at")
    with pytest.raises(PostgresError, match=r"lacks column\(s\) orders\.amount, orders\.updated_at of the data model"):
        PostgresSource(database)
    execute(database, "DROP TABLE loans")
    with pytest.raises(PostgresError, match=r"has no table loans \(") as error:
        PostgresSource(database)
    assert "\n" not in str(error.value)


def test_a_wrong_password_host_or_database_is_one_line_without_the_password(postgres):
    wrong = postgres.url().replace(postgres.password, "not-the-password")
    cases = {
        wrong: 'password authentication failed for user "scfrisk"',
        postgres.url("nowhere"): 'database "nowhere" does not exist',
        postgres.url().replace(f":{postgres.port}/", ":1/"): "Connection refused",
        postgres.url().replace("@127.0.0.1", "@no-such-host.invalid"): "could not translate host name",
        postgres.url().replace(f":{postgres.port}/", ":port/"): "invalid integer value",
    }
    for url, reason in cases.items():
        with pytest.raises(PostgresError) as error:
            PostgresSource(url)
        message = str(error.value)
        assert reason in message and "\n" not in message, message
        assert postgres.password not in message and "not-the-password" not in message, message
        assert message.startswith("cannot connect to PostgreSQL postgresql://scfrisk@")


def test_simulate_out_a_database_loads_the_platform_and_again_changes_nothing(postgres, database, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    url = database.replace(f":{postgres.password}@", "@")
    monkeypatch.setattr(sys, "argv", ["scfrisk", "simulate", "--merchants", "40", "--months", "20", "--out", url,
                                      "--files", str(tmp_path / "sim")])
    run()
    out = capsys.readouterr().out
    with PostgresSource(url) as source:
        counts = {name: source.rows(name) for name in TABLES}
        orders = pulled(source, "orders")
    assert counts == {name: pads.dataset(tmp_path / "sim" / name).count_rows() for name in TABLES}
    assert f"loaded the platform into {url}: merchants 40, orders {counts['orders']:,}" in out
    assert orders.equals(pads.dataset(tmp_path / "sim" / "orders").to_table().cast(orders.schema).sort_by("order_id"))
    assert (tmp_path / "sim" / "oracle" / "loans").is_dir()
    run()  # the same platform again: upserted by key, nothing added
    with PostgresSource(url) as source:
        assert {name: source.rows(name) for name in TABLES} == counts


def test_simulate_days_into_a_database_upserts_the_base_then_each_day_into_the_whole_history(
    postgres, database, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "argv", ["scfrisk", "simulate", "--merchants", "40", "--months", "20", "--days", "3",
                                      "--out", database])
    run()
    assert "loaded the base and 3 daily batches (upserted day by day) into" in capsys.readouterr().out
    simulate_platform(SimulationConfig(n_merchants=40, months=20, seed=42, start="2024-01-01"), tmp_path / "full")
    with PostgresSource(database) as source:
        for name, spec in TABLES.items():
            whole = pads.dataset(tmp_path / "full" / name).to_table()
            assert pulled(source, name).equals(whole.cast(spec.arrow_schema).sort_by(spec.key)), name


def test_simulate_out_a_database_with_a_wrong_password_is_one_line_before_simulating(postgres, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    wrong = postgres.url().replace(postgres.password, "not-the-password")
    monkeypatch.setattr(sys, "argv", ["scfrisk", "simulate", "--out", wrong, "--files", str(tmp_path / "sim")])
    with pytest.raises(SystemExit) as exit_:
        run()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot connect to PostgreSQL {postgres.url(password=False)}: connection to server at "
        f'"127.0.0.1", port {postgres.port} failed: FATAL: password authentication failed for user "scfrisk"']
    assert "not-the-password" not in stderr and not (tmp_path / "sim").exists()
