"""The raw store on object storage: a local S3-compatible server (moto's, in its own process on loopback)."""

from __future__ import annotations

import logging
import zlib
from datetime import datetime

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from core import raw_store
from core.partitioning import merchant_bucket, parse_partition_key
from core.raw_store import RawStore
from core.schemas import TABLES, conform
from tests.batch_builder import valid_batch


def load(store: RawStore, tables: dict) -> dict[str, list[str]]:
    with store.transaction() as batch:
        for name, frame in tables.items():
            batch.stage(name, conform(pa.Table.from_pandas(frame, preserve_index=False), TABLES[name]))
        return batch.commit()


def order_ids(store: RawStore) -> list[int]:
    con = duckdb.connect()
    return [r[0] for r in con.sql(f"SELECT order_id FROM {store.register(con, 'orders')} ORDER BY 1").fetchall()]


def test_an_s3_store_holds_the_same_snapshot_as_a_local_one(bucket, tmp_path):
    remote, local = RawStore(f"s3://{bucket}/raw"), RawStore(tmp_path / "raw")
    assert load(remote, valid_batch()) == load(local, valid_batch())
    assert remote.snapshot_id == local.snapshot_id
    assert order_ids(remote) == order_ids(local) == [1, 2, 3, 4, 5, 6]
    assert DeltaTable(remote.table_url("orders")).version() == 0

    first = remote.snapshot_id
    more = valid_batch()["orders"]
    more["order_id"] += 100
    written = load(remote, {"orders": more})
    assert {parse_partition_key(key)[0] for key in written["orders"]} == {"2024-01", "2024-02"}
    assert len(order_ids(remote)) == 12
    assert order_ids(remote.at(first)) == [1, 2, 3, 4, 5, 6]  # time travel on object storage


def test_an_s3_commit_cut_between_tables_is_invisible_until_the_next_write(bucket, monkeypatch):
    store = RawStore(f"s3://{bucket}/raw")
    load(store, valid_batch())
    before = store.snapshot_id
    batch = valid_batch()
    batch["merchants"].loc[0, "region"] = "south"
    batch["orders"]["order_id"] += 100
    commit = RawStore._commit_table

    def crash_before_orders(self, name, entry, sequence):
        if name == "orders":
            raise OSError("connection reset")
        return commit(self, name, entry, sequence)

    with monkeypatch.context() as patch, pytest.raises(OSError, match="connection reset"):
        patch.setattr(RawStore, "_commit_table", crash_before_orders)
        load(store, {"merchants": batch["merchants"], "orders": batch["orders"]})
    assert DeltaTable(store.table_url("merchants")).version() == 1  # committed, but not in the manifest
    assert store.snapshot_id == before and len(order_ids(store)) == 6

    assert load(store, {}) == {}  # any next write finishes the interrupted one first
    assert store.versions["merchants"] == store.versions["orders"] == 1
    assert store.snapshot_id != before and len(order_ids(store)) == 12


def test_merchant_buckets_are_the_same_in_every_process_and_version():
    """CRC-32 of the id: fixed values, so a store written today is read by any worker tomorrow (Python's
    hash() differs per process, DuckDB's may change between releases)."""
    ids = pa.chunked_array([["M0000001", "M0000042"], ["M0000001", None]])
    assert merchant_bucket(ids, 8).to_pylist() == [zlib.crc32(b"M0000001") % 8, zlib.crc32(b"M0000042") % 8,
                                                   zlib.crc32(b"M0000001") % 8, 0]
    assert merchant_bucket(ids, 8).to_pylist() == [4, 2, 4, 0] and merchant_bucket(ids, 8).type == pa.int16()


def test_a_worker_registers_only_its_buckets(tmp_path):
    store = RawStore(tmp_path / "raw", buckets=4)
    load(store, valid_batch())
    buckets = merchant_bucket(pa.array(valid_batch()["orders"]["merchant_id"]), 4).to_pylist()
    by_bucket = {b: sorted(o for o, ob in zip(valid_batch()["orders"]["order_id"], buckets, strict=True) if ob == b)
                 for b in set(buckets)}
    assert len(by_bucket) > 1 and set(store.partitions("orders")) == {
        (m, b) for m, b in zip(["2024-01"] * 3 + ["2024-02"] * 3, buckets, strict=True)}
    for bucket, orders in by_bucket.items():
        con = duckdb.connect()
        view = store.register(con, "orders", buckets=[bucket])
        assert [r[0] for r in con.sql(f"SELECT order_id FROM {view} ORDER BY 1").fetchall()] == orders
    con = duckdb.connect()
    assert con.sql(f"SELECT count(*) FROM {store.register(con, 'orders', buckets=[])}").fetchall() == [(0,)]
    assert sorted(store.distinct_values("merchants", "merchant_id", [buckets[0]]).to_pylist()) == sorted(
        {m for m, b in zip(valid_batch()["orders"]["merchant_id"], buckets, strict=True) if b == buckets[0]})


def test_a_time_range_reads_only_the_files_that_may_hold_it_and_every_row_of_it(tmp_path, monkeypatch):
    """The daily refresh looks for the rows whose times fall in the day, one time column at a time; the first
    and last times of each partition, in the manifest, let it open only the files that may hold one."""
    batch = valid_batch()
    orders = batch["orders"]
    store = RawStore(tmp_path / "raw", buckets=1)
    # The January file as an older writer left it: no times recorded. It must be read whatever the range.
    monkeypatch.setattr(raw_store, "_time_ranges", lambda table, columns: {})
    load(store, {**batch, "orders": orders[orders["ordered_at"] < "2024-02-01"]})
    monkeypatch.undo()
    load(store, {"orders": orders[orders["ordered_at"] >= "2024-02-01"]})
    (february,) = [p for k, p in store.manifest()["tables"]["orders"]["partitions"].items() if "2024-02" in k]
    assert february["times"]["ordered_at"] == "2024-02-02/2024-02-15"
    assert february["times"]["delivered_at"] == "2024-02-06/2024-02-06"
    assert "refunded_at" not in february["times"]  # nulls only

    def read(column: str, start: datetime, end: datetime) -> tuple[list[int], int]:
        con = duckdb.connect()
        view = store.register(con, "orders", view="during", during=(column, start, end))
        rows = con.sql(f"SELECT order_id FROM {view} WHERE {column} >= $s AND {column} < $e ORDER BY 1",
                       params={"s": start, "e": end}).fetchall()
        (sql,), = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'during'").fetchall()
        files = sql.count(".parquet")
        return [r[0] for r in rows], files

    assert read("ordered_at", datetime(2024, 2, 10), datetime(2024, 2, 11)) == ([5], 2)  # January kept: no stats
    assert read("delivered_at", datetime(2024, 1, 7), datetime(2024, 1, 8)) == ([1], 1)  # February's: 2024-02-06
    assert read("delivered_at", datetime(2024, 2, 6), datetime(2024, 2, 7)) == ([4], 2)
    assert read("ordered_at", datetime(2024, 2, 15, 21), datetime(2024, 2, 16)) == ([], 2)  # its last day, by day
    assert read("ordered_at", datetime(2024, 2, 16), datetime(2024, 2, 17)) == ([], 1)
    assert read("refunded_at", datetime(2024, 2, 1), datetime(2024, 3, 1)) == ([], 1)  # February's are all null
    january = orders[orders["ordered_at"] < "2024-02-01"].assign(amount=lambda o: o["amount"] + 1)
    load(store, {"orders": january})  # a correction: the file rewritten, with its statistics
    assert read("ordered_at", datetime(2024, 2, 10), datetime(2024, 2, 11)) == ([5], 1)
    assert read("refunded_at", datetime(2024, 1, 30), datetime(2024, 1, 31)) == ([3], 1)


def test_source_state_moves_only_with_its_batch(tmp_path, monkeypatch):
    store = RawStore(tmp_path / "raw")
    with store.transaction() as batch:
        batch.stage("merchants", conform(pa.Table.from_pandas(valid_batch()["merchants"]), TABLES["merchants"]))
        batch.commit("b1", {"pg": {"merchants": "2024-01-31"}})
    assert store.source_state() == {"pg": {"merchants": "2024-01-31"}}

    def power_cut(self, name, entry, sequence):
        raise OSError("power cut")

    more = valid_batch()["merchants"].assign(region="south")
    with monkeypatch.context() as patch, pytest.raises(OSError):
        patch.setattr(RawStore, "_commit_table", power_cut)
        with store.transaction() as batch:
            batch.stage("merchants", conform(pa.Table.from_pandas(more), TABLES["merchants"]))
            batch.commit("b2", {"pg": {"merchants": "2024-02-29"}})
    assert RawStore(tmp_path / "raw").source_state() == {"pg": {"merchants": "2024-01-31"}}  # not committed
    store.recover()  # the journal rolls the batch forward: data and watermark together
    assert store.source_state() == {"pg": {"merchants": "2024-02-29"}} and store.loaded_batch() == "b2"
    with store.transaction() as batch:  # a folder batch ({}) keeps what another source committed
        batch.commit("b3", {})
    assert store.source_state() == {"pg": {"merchants": "2024-02-29"}}


def test_a_store_keeps_its_bucket_count_whatever_the_setting(tmp_path, caplog):
    load(RawStore(tmp_path / "raw", buckets=4), {"merchants": valid_batch()["merchants"]})
    store = RawStore(tmp_path / "raw", buckets=16)
    with caplog.at_level(logging.WARNING, logger="core.raw_store"):
        load(store, {"orders": valid_batch()["orders"]})
    assert "keeps its 4 merchant buckets" in caplog.text and store.buckets == 4
    assert {b for _, b in store.partitions("orders")} <= set(range(4))


def test_a_rewritten_partition_says_what_changed_so_a_reader_need_not_compare_the_versions(tmp_path):
    """A day's pull rewrites partitions of millions of rows for a few changed ones. Beside each rewritten
    partition a change file holds the rows delivered and those they replace; `changed_rows` between two
    snapshots one batch apart reads it alone (here: with the old version's file gone, comparing is impossible),
    and compares the versions where it cannot (two batches apart). A vacuum removes it with its partition."""
    from datetime import timedelta, timezone

    batch = valid_batch()
    orders = batch["orders"]
    store = RawStore(tmp_path / "raw", buckets=1)
    load(store, batch)
    first = store.pinned()
    january = orders[orders["ordered_at"] < "2024-02-01"]
    fixed = january.iloc[:1].assign(amount=lambda o: o["amount"] + 1)
    new = january.iloc[:1].assign(order_id=999, merchant_id=january["merchant_id"].iloc[1],
                                  ordered_at=january["ordered_at"].iloc[1])
    load(store, {"orders": pd.concat([fixed, new])})
    second = store.pinned()
    (key,) = [k for k in second.partitions("orders") if k[0] == "2024-01"]
    part = second.manifest()["tables"]["orders"]["partitions"][raw_store.partition_key(*key)]
    was = first.manifest()["tables"]["orders"]["partitions"][raw_store.partition_key(*key)]
    assert part["changed_from"] == was["sha256"]

    def changed(now: RawStore, before: RawStore) -> list[tuple]:
        con = duckdb.connect()
        sql = now.changed_rows(con, before, "orders", now.changed_partitions(before)["orders"],
                               ["amount", "ordered_at"], "ordered_at")
        return sorted(con.execute(sql).fetchall())

    expected = sorted([(fixed["merchant_id"].iloc[0], fixed["ordered_at"].iloc[0].to_pydatetime())] * 2
                      + [(new["merchant_id"].iloc[0], new["ordered_at"].iloc[0].to_pydatetime())])
    old_file = store._file("orders", raw_store._file_name(raw_store.partition_key(*key), was["sha256"]))
    saved = store.fs.cat_file(old_file)
    store.fs.rm_file(old_file)
    assert changed(second, first) == expected  # the change file: the old version is not read
    store.fs.pipe_file(old_file, saved)

    load(store, {"orders": january.iloc[2:3].assign(amount=lambda o: o["amount"] * 2)})
    third = store.pinned()
    row = january.iloc[2]
    assert changed(third, first) == sorted(expected + [(row["merchant_id"], row["ordered_at"].to_pydatetime())] * 2)

    change_files = store.fs.glob(f"{store._file('orders', raw_store.CHANGES)}/**/*.parquet")
    assert len(change_files) == 2
    store.vacuum(protected=[], cutoff=datetime.now(timezone.utc) + timedelta(days=1))
    assert store.fs.glob(f"{store._file('orders', raw_store.CHANGES)}/**/*.parquet") == [
        f for f in change_files if third.manifest()["tables"]["orders"]["partitions"][
            raw_store.partition_key(*key)]["sha256"][:32] in f]
