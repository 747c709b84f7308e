"""Ingestion end to end: all-or-nothing batches, idempotent and incremental upserts, CSV, CLI, Prefect."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from core.batch import BatchError, locate_tables
from core.errors import ScfriskError
from core.partitioning import merchant_bucket, month_key, partition_key
from core.raw_store import RawStore
from core.rules import DataValidationError
from core.schemas import TABLES, conform
from core.settings import Settings
from core.sources import FolderSource, Source, open_source
from pipelines.cli import run
from pipelines.ingest import ingest, ingest_flow
from tests.batch_builder import valid_batch, write_batch

NOW = datetime(2024, 3, 1)


def store_files(settings: Settings) -> dict[str, str]:
    root = settings.path("raw_store")
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Path:
    """A workspace holding the whole valid batch, ingested once; tests copy it."""
    home = tmp_path_factory.mktemp("loaded") / "home"
    ingest(write_batch(home.parent / "batch", valid_batch()), Settings(home=home), NOW)
    return home


@pytest.fixture
def store(loaded: Path, tmp_path: Path) -> Settings:
    shutil.copytree(loaded, tmp_path / "home")
    return Settings(home=tmp_path / "home")


def orders_rows(raw: RawStore) -> list[tuple]:
    con = duckdb.connect()
    return con.sql(f"SELECT order_id, status FROM {raw.register(con, 'orders')} ORDER BY order_id").fetchall()


def test_batch_lands_partitioned_by_month_and_merchant_bucket_with_a_manifest(store):
    raw = RawStore(store.path("raw_store"))
    manifest = raw.manifest()
    assert manifest["tables"]["orders"]["rows"] == 6 and manifest["buckets"] == store.compute.merchant_buckets
    orders = pq.read_table(write_batch(store.home.parent / "b", valid_batch()) / "orders.parquet")
    expected = {
        (month, bucket)
        for month, bucket in zip(
            month_key(orders.column("ordered_at")).to_pylist(),
            merchant_bucket(orders.column("merchant_id"), raw.buckets).to_pylist(),
            strict=True,
        )
    }
    assert set(raw.partitions("orders")) == expected and len(expected) > 2
    delta = DeltaTable(raw.table_url("orders")).partitions()
    assert {(p["month"], int(p["bucket"])) for p in delta} == expected
    con = duckdb.connect()
    months = con.sql(f"SELECT DISTINCT strftime(ordered_at, '%Y-%m') FROM {raw.register(con, 'orders')}")
    assert len(months.fetchall()) == 2
    assert raw.versions == {name: 0 for name in valid_batch()}  # one Delta commit per table
    assert raw.snapshot_id and not (raw.root / "_commit.json").exists()


def test_reingesting_the_same_data_changes_nothing(store, tmp_path):
    before = store_files(store)
    snapshot = RawStore(store.path("raw_store")).snapshot_id
    folder = write_batch(tmp_path / "again", valid_batch(), fmt="csv")  # new files, same data
    result = ingest(folder, store, NOW)
    assert not result.already_loaded and result.rules_checked > 0
    after = store_files(store)
    assert {k: v for k, v in after.items() if k != "_manifest.json"} == {
        k: v for k, v in before.items() if k != "_manifest.json"}
    assert RawStore(store.path("raw_store")).snapshot_id == snapshot
    assert set(result.partitions_written) == set(valid_batch())
    assert all(months == [] for months in result.partitions_written.values())
    # It changed nothing, so ingesting it again would not either: the next time it is not even read
    # (else a batch checked by rules newer than the store's data is validated again on every ingest).
    assert ingest(folder, store, NOW).already_loaded


def test_the_batch_that_made_the_snapshot_is_not_ingested_again(store, tmp_path):
    """A pipeline rerun after a later stage failed: same files, same rules, nothing to read or validate."""
    before = store_files(store)
    again = ingest(write_batch(tmp_path / "copy", valid_batch()), store, NOW)  # same bytes, another folder
    assert again.already_loaded and again.rules_checked == 0
    assert "already loaded" in again.describe() and store_files(store) == before

    batch = valid_batch()
    batch["orders"].loc[0, "amount"] = 99.0  # one value changed: a new batch, validated and loaded
    changed = ingest(write_batch(tmp_path / "changed", batch), store, NOW)
    assert not changed.already_loaded and len(changed.partitions_written["orders"]) == 1
    assert changed.partitions_written["orders"][0].startswith("month=2024-01/bucket=")


def test_failed_batch_leaves_the_store_byte_identical(store, tmp_path):
    before = store_files(store)
    batch = valid_batch()
    batch["orders"].loc[0, "amount"] = -1.0  # bad row in an otherwise good (and otherwise new) batch
    batch["orders"]["order_id"] += 100
    with pytest.raises(DataValidationError, match=r"orders\.amount: .* failed for 1 of 6 rows, e\.g\. -1\.0"):
        ingest(
            write_batch(tmp_path / "bad", {"merchants": batch["merchants"], "orders": batch["orders"]}),
            store,
            NOW,
        )
    assert store_files(store) == before


def test_a_commit_cut_between_two_tables_is_invisible_and_finished_by_the_next_write(
    store, tmp_path, monkeypatch, caplog
):
    batch = valid_batch()
    batch["merchants"].loc[0, "region"] = "south"  # both tables change: two Delta commits
    batch["orders"]["order_id"] += 100
    two_tables = {"merchants": batch["merchants"], "orders": batch["orders"]}
    clean = Settings(home=tmp_path / "clean")
    shutil.copytree(store.home, clean.home)
    with caplog.at_level(logging.WARNING, logger="core.raw_store"):
        ingest(write_batch(tmp_path / "b1", two_tables), clean, NOW)
    assert "interrupted" not in caplog.text, "a clean commit is not reported as a recovery"

    commit, committed = RawStore._commit_table, []

    def crash_after_the_first_table(self, name, entry, sequence):
        if committed:
            raise OSError("power cut")
        committed.append(name)
        return commit(self, name, entry, sequence)

    monkeypatch.setattr(RawStore, "_commit_table", crash_after_the_first_table)
    raw = RawStore(store.path("raw_store"))
    before, rows_before = raw.snapshot_id, orders_rows(raw)
    with pytest.raises(OSError, match="power cut"):
        ingest(write_batch(tmp_path / "b2", two_tables), store, NOW)
    monkeypatch.undo()
    assert committed == ["merchants"], "merchants is committed in Delta, orders is not: the batch is half-done"
    assert DeltaTable(raw.table_url("merchants")).version() == raw.versions["merchants"] + 1

    assert raw.snapshot_id == before and orders_rows(raw) == rows_before  # readers see the old snapshot
    con = duckdb.connect()
    regions = con.sql(f"SELECT region FROM {raw.register(con, 'merchants')} ORDER BY merchant_id").fetchall()
    assert regions[0] == ("east",)

    with caplog.at_level(logging.WARNING, logger="core.raw_store"):
        ingest(write_batch(tmp_path / "b3", two_tables), store, NOW)  # the next write finishes it first
    assert "finishing a commit that was interrupted" in caplog.text
    finished, expected = RawStore(store.path("raw_store")), RawStore(clean.path("raw_store"))
    assert finished.versions == expected.versions, "merchants was not committed twice"
    assert finished.snapshot_id == expected.snapshot_id != before
    assert orders_rows(finished) == orders_rows(expected)


def test_time_travel_reads_an_earlier_snapshot(store, tmp_path):
    raw = RawStore(store.path("raw_store"))
    first, rows = raw.snapshot_id, orders_rows(raw)
    batch = valid_batch()
    batch["orders"]["order_id"] += 100
    ingest(write_batch(tmp_path / "more", {"orders": batch["orders"]}), store, NOW)
    assert len(orders_rows(raw)) == 12 and raw.versions["orders"] == 1
    past = raw.at(first)
    assert orders_rows(past) == rows and past.versions["orders"] == 0
    with pytest.raises(ScfriskError, match="no snapshot feedbeef"):
        raw.at("feedbeef")


def test_a_file_url_addresses_the_same_store(store):
    path = RawStore(store.path("raw_store"))
    url = RawStore(store.path("raw_store").absolute().as_uri())
    assert url.root == path.root.absolute()
    assert url.snapshot_id == path.snapshot_id and orders_rows(url) == orders_rows(path)


def test_new_month_appends_and_redelivered_rows_replace(store, tmp_path):
    before = store_files(store)
    snapshot_before = RawStore(store.path("raw_store")).snapshot_id
    orders = valid_batch()["orders"]
    march = orders.iloc[:2].copy()
    march["order_id"] = [7, 8]
    march["status"] = ["paid", "paid"]
    march[[c for c in march.columns if c.endswith("_at") and c != "ordered_at"]] = pd.NaT
    march["rating"] = pd.array([None, None], dtype="Int8")
    march["ordered_at"] = pd.to_datetime(["2024-02-28 10:00", "2024-02-29 11:00"]) + pd.Timedelta(days=2)
    march["promised_delivery_at"] = march["ordered_at"] + pd.Timedelta(days=5)
    refunded = orders.iloc[[0]].copy()  # order 1 (January) is now refunded
    refunded["status"] = "refunded"
    refunded["refunded_at"] = pd.Timestamp("2024-01-20")
    result = ingest(
        write_batch(tmp_path / "march", {"orders": pd.concat([march, refunded])}),
        store,
        NOW + pd.Timedelta(days=2),
    )

    after = store_files(store)
    assert {key.split("/")[0] for key in result.partitions_written["orders"]} == {"month=2024-01", "month=2024-03"}
    untouched = ("orders/month=2024-02/", "merchants/")
    assert {k: v for k, v in after.items() if k.startswith(untouched) and "_delta_log" not in k} == {
        k: v for k, v in before.items() if k.startswith(untouched) and "_delta_log" not in k
    }
    raw = RawStore(store.path("raw_store"))
    assert orders_rows(raw) == [(1, "refunded"), (2, "cancelled"), (3, "refunded"), (4, "delivered"),
                                (5, "shipped"), (6, "paid"), (7, "paid"), (8, "paid")]  # fmt: skip
    assert raw.manifest()["tables"]["orders"]["rows"] == 8
    assert result.snapshot_id == raw.snapshot_id != snapshot_before


def test_csv_and_parquet_parts_load_the_same_snapshot(loaded, tmp_path):
    parquet_snapshot = RawStore(Settings(home=loaded).path("raw_store")).snapshot_id
    batch = valid_batch()
    folder = write_batch(tmp_path / "csv", batch, fmt="csv")
    write_batch(folder, {"orders": batch["orders"]}, fmt="parts")  # folder of parts instead of orders.csv
    (folder / "orders.csv").unlink()
    (folder / "oracle").mkdir()  # the simulator's ground truth: never ingested
    (folder / "oracle" / "labels.parquet").write_bytes(b"not data")
    result = ingest(folder, Settings(home=tmp_path / "home"), NOW)
    assert result.snapshot_id == parquet_snapshot


@pytest.mark.parametrize("manifest", [
    '{"snapshot_id": "0123456789abcdef", "tables": {}}',  # before Delta Lake
    '{"snapshot_id": "0123456789abcdef", "sequence": 1, "tables": {"orders": {}}}',  # months only
])
def test_a_store_in_an_older_layout_is_named_not_misread(tmp_path, manifest):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "_manifest.json").write_text(manifest)
    with pytest.raises(ScfriskError, match="older layout .* ingest its batches again into an empty raw store"):
        RawStore(tmp_path / "raw").manifest()


def test_unknown_table_file_is_rejected(tmp_path):
    folder = write_batch(tmp_path / "b", {"merchants": valid_batch()["merchants"]})
    (folder / "sellers.parquet").write_bytes(b"")
    with pytest.raises(BatchError, match="unknown table file 'sellers.parquet'.*expected <table>.parquet"):
        locate_tables(folder)


def test_cli_prints_one_error_line_and_exits_2_for_a_malformed_file(
    prefect_server, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "orders.parquet").write_bytes(b"this is not parquet")
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "argv", ["scfrisk", "ingest", "--source", str(folder)])
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot read table 'orders' from {folder / 'orders.parquet'}: " + errors[0].split(": ", 2)[2]
    ]
    assert "Traceback" not in stderr
    assert not (tmp_path / "home" / "raw").exists()


def test_ingest_flow_runs_through_prefect(prefect_server, tmp_path):
    settings = Settings(home=tmp_path / "home")
    batch = valid_batch()
    folder = write_batch(
        tmp_path / "b", {"merchants": batch["merchants"], "orders": batch["orders"]}, fmt="parts"
    )
    result = ingest_flow(source=str(folder), settings=settings)
    assert result.store_rows == {"merchants": 3, "orders": 6}
    assert f"raw store {settings.path('raw_store')}" in result.describe()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScfriskError, match="no table files"):
        ingest_flow(source=str(tmp_path / "empty"), settings=settings)


def test_a_key_repeated_across_partitions_is_rejected_counted_over_the_table(store, tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.ingest.UNIT_ROWS", 1)  # each partition validated alone, as at scale
    batch = valid_batch()
    orders = batch["orders"]
    orders.loc[3, "order_id"] = 1  # order 1 again, by another merchant in another month: another partition
    orders.loc[4, "order_id"] = 1
    orders["order_id"] += 100
    before = store_files(store)
    with pytest.raises(DataValidationError, match=r"orders\.order_id: expect_column_values_to_be_unique failed for "
                                                  r"3 of 6 rows, e\.g\. 101(;| \()"):
        ingest(write_batch(tmp_path / "dup", {"orders": orders}), store, NOW)
    assert store_files(store) == before


def test_a_row_redelivered_for_another_merchant_leaves_its_old_partition(store, tmp_path):
    raw = RawStore(store.path("raw_store"))
    orders = valid_batch()["orders"]
    moved = orders.iloc[[0]].assign(merchant_id="M0000003")  # order 1 was M0000001's
    old = (month_key(pa.array(orders["ordered_at"].iloc[[0]])).to_pylist()[0],
           merchant_bucket(pa.array(["M0000001"]), raw.buckets)[0].as_py())
    new_bucket = merchant_bucket(pa.array(["M0000003"]), raw.buckets)[0].as_py()
    assert old[1] != new_bucket
    result = ingest(write_batch(tmp_path / "moved", {"orders": moved}), store, NOW)
    con = duckdb.connect()
    rows = con.sql(f"SELECT order_id, merchant_id FROM {raw.register(con, 'orders')} WHERE order_id = 1").fetchall()
    assert rows == [(1, "M0000003")] and raw.manifest()["tables"]["orders"]["rows"] == 6
    assert partition_key(*old) in result.partitions_written["orders"]


class _Stream:
    """A source of the protocol (as a database would be): each table in several record batches, a state."""

    description = "a test stream"

    def __init__(self, tables: dict[str, pd.DataFrame]) -> None:
        self.data = {n: conform(pa.Table.from_pandas(f, preserve_index=False), TABLES[n]) for n, f in tables.items()}

    def tables(self) -> list[str]:
        return [n for n in TABLES if n in self.data]

    def fingerprint(self) -> str:
        return "stream-1"

    def batches(self, name):
        yield from self.data[name].to_batches(max_chunksize=2)

    def state(self):
        return {"stream": {"orders": 6}}


def test_a_source_streams_in_record_batches_and_its_state_commits_with_the_data(settings, loaded):
    source = _Stream(valid_batch())
    assert isinstance(source, Source) and len(list(source.batches("orders"))) == 3
    result = ingest(source, settings, NOW)
    raw = RawStore(settings.path("raw_store"))
    assert result.source == "a test stream" and raw.source_state() == {"stream": {"orders": 6}}
    assert raw.snapshot_id == RawStore(Settings(home=loaded).path("raw_store")).snapshot_id


def test_a_source_is_chosen_by_its_text(tmp_path):
    assert isinstance(open_source(str(write_batch(tmp_path / "b", valid_batch()))), FolderSource)
    assert open_source((tmp_path / "b").as_uri()).tables() == list(valid_batch())
    with pytest.raises(BatchError, match=r"unknown source 'ftp://\.\.\.': give a batch folder or one of postgresql://"):
        open_source("ftp://host/batch")
