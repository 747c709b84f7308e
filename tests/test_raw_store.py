"""The raw store on object storage: a local S3-compatible server (moto's, in its own process on loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import boto3
import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from core.partitioning import parse_partition_key
from core.raw_store import RawStore
from core.schemas import TABLES, conform
from tests.batch_builder import valid_batch


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server in a child process (delta-rs holds the GIL while it waits on a request, so a server
    thread in this process would never answer)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.terminate()
        pytest.fail("moto's S3 server did not start")
    yield url
    server.terminate()
    server.wait()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, request) -> str:
    """An empty bucket; credentials and endpoint through the usual AWS variables, as on real S3."""
    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }.items():
        monkeypatch.setenv(key, value)
    name = request.node.name.replace("_", "-")[:40]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


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
