"""The validated raw store: one Delta Lake table per raw table, `<root>/<table>`, partitioned by month and
merchant bucket.

Every table is partitioned by the month of its own time column (see `core.schemas`) and by the hash bucket
of its merchant (`core.partitioning`): a worker reads one bucket's files alone. The partition columns
`month` and `bucket` are Delta's; readers never see them. A store's bucket count is fixed when it is
created (recorded in the manifest): a later setting that differs is ignored with a warning.

The store is addressed by a URL (`file://`, `s3://`, ...; a plain path is a local folder): the data and its
commits go through Delta Lake (delta-rs), whose commit is atomic on object storage too,
where a rename is a copy and a delete.

A Delta commit covers one table, a batch several. So readers do not read a table's latest version: the
manifest `_manifest.json`, written last by a batch (one PUT, whole or not at all), names the version of
every table, and readers are pinned to those. Its `snapshot_id` hashes those versions with each partition's
content hash: it changes exactly when the data does, so downstream stages can reuse work computed on the
same snapshot, and a model that records it can re-read that very data (`RawStore.at`, Delta time travel:
every manifest is also kept under `_snapshots/<id>.json`). It also names the batch (a fingerprint of its
files) whose commit made that snapshot, so the same batch is not ingested twice.

Writes are all or nothing and incremental. Staging rebuilds every partition the batch touches (upserted
by the table's key, sorted by it, written deterministically and named by its content) as a Parquet file
beside the table's data, not yet committed, so invisible; partitions are staged independently, so any
process that can reach the store may stage some (`RawStore.stage_partition`). Only after the whole batch
has passed does `commit` write a journal (each table's files added and removed), commit each table (one
Delta commit removing the touched partitions' old files and adding the new ones: the copy-on-write form of
a MERGE by key), then the manifest (which also carries the source's state, e.g. a database's watermarks,
so they move exactly when the data does). Beside a partition rewritten over an earlier version, staging also
writes what changed (`_changes/`: the rows delivered and those they replace), so a reader of a day's changes
(`changed_rows`) need not compare millions of rows for a few. A crash
between two tables' commits leaves the manifest, and so every reader, on the old snapshot; the next write
rolls the journal forward, skipping tables whose commit carries the batch's transaction number (Delta's
idempotent `txn` action). A batch that fails before `commit` removes the files it staged.

Why not delta-rs's own `merge`: it writes and commits in one call, but a batch must be validated whole
before any table commits and only one table fits in memory at a time, so the rewrite happens at staging and
the commit later. One writer at a time (as before); readers may be many, anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import DeltaError
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    PostCommitHookProperties,
    RemoveAction,
    create_table_with_add_actions,
)
from deltalake.transaction import Transaction as AppTransaction

from core import storage
from core.errors import ScfriskError
from core.partitioning import BUCKET, MONTH, parse_partition_key, partition_key, split_by_partition
from core.schemas import CHANGED_AT, TABLES, UPDATED_AT, TableSpec
from core.sql import duckdb_connect
from core.storage import is_local, local_path, modified_time

if TYPE_CHECKING:
    from core.settings import Settings

DEFAULT_BUCKETS = 8
"""Merchant buckets of a new store when the writer does not say (`[compute] merchant_buckets`)."""

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SNAPSHOTS = "_snapshots"
JOURNAL = "_commit.json"
STAGING = "_staging"
"""The folder of the batches being staged (`core.staging`): while it exists, a batch may be writing files."""
CHANGES = "_changes"
"""A table's folder of change files: beside a partition file that replaced an earlier version, the rows that
differ from it (`RawStore.stage_partition`), so a reader of what changed need not compare the versions."""
APP_ID = "scfrisk-raw-store"
"""Delta transaction id of the store's batches: a table's commit records the batch's sequence number."""

KEEP_LOG = PostCommitHookProperties(cleanup_expired_logs=False)
"""Every commit of the store keeps the whole Delta log. Delta's default removes commit files older than
`delta.logRetentionDuration` (30 days) whenever a commit writes a checkpoint (every 100 commits): after
about 100 daily batches the versions before that checkpoint could no longer be loaded, and with them the
snapshot a model was trained on (`at`). A commit file is a few kB; `vacuum` removes data files only."""
TABLE_CONFIGURATION = {"delta.enableExpiredLogCleanup": "false"}
"""The same, recorded in each new table, for any other Delta writer of it (an OPTIMIZE from Spark)."""

EMPTY_MANIFEST: dict[str, Any] = {"snapshot_id": None, "sequence": 0, "tables": {}}

PARTITION_FIELDS = [pa.field(MONTH, pa.string()), pa.field(BUCKET, pa.int16())]


@dataclass(frozen=True)
class StagedPartition:
    """One partition rebuilt for a batch: its manifest entry ({} when emptied), and the file written
    for it (None when its content did not change, or it was emptied)."""

    table: str
    key: str
    entry: dict[str, Any]
    add: dict[str, Any] | None = None
    written: str | None = None
    """The file this staging created (not there before): removed again unless the batch commits."""
    stale: int = 0
    """Delivered rows kept out: older than the stored rows of their keys (`RawStore.key_moves`)."""


@dataclass(frozen=True)
class KeyMoves:
    """Stored rows a batch moves, and delivered rows it must keep out (`RawStore.key_moves`), each by
    partition (`partition_key`)."""

    leaving: dict[str, pa.Array]
    """Keys of stored rows re-delivered into another partition, by the stored partition they leave."""
    stale: dict[str, pa.Array]
    """Keys of delivered rows older than the stored ones, by the partition they were delivered to."""


@dataclass
class Vacuum:
    """What `RawStore.vacuum` removed, or would remove (a dry run)."""

    kept: list[str]
    """Snapshots still re-readable with `at`, oldest first."""
    dropped: list[str]
    """Snapshots whose record was removed: `at` refuses them by name, rather than failing on a missing file."""
    files: dict[str, int] = field(default_factory=dict)
    """Files removed, data files and the dropped snapshots' records (their path in the store's file system),
    and their bytes."""


class RawStore:
    """A raw store: the snapshot readers are pinned to, plus the transactional batch write."""

    def __init__(
        self,
        root: Path | str,
        storage_options: Mapping[str, str] | None = None,
        snapshot: Mapping[str, Any] | None = None,
        buckets: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        """`root`: a folder or a URL; `storage_options`: delta-rs's (the `AWS_*` names; fsspec gets them as it
        names them, `core.storage`), credentials usually better left to the environment; `snapshot` pins
        reads to a past manifest; `buckets`: the merchant buckets a writer would create the store with (an
        existing store keeps its own); `settings`: the workspace whose DuckDB budget and spill folder the
        store's readers get (`connect`)."""
        text = str(root)
        local = is_local(text)
        self.root: Path | str = local_path(text) if local else text
        self.url = str(Path(self.root).absolute()) if local else text
        """Where fsspec and delta-rs find the store: an absolute path on a local disk, else the URL."""
        self.storage_options = dict(storage_options or {})
        self.fs, self._path = storage.filesystem(self.url, self.storage_options)
        self._pinned = dict(snapshot) if snapshot is not None else None
        self._configured_buckets = buckets
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings) -> RawStore:
        """The workspace's raw store (`[paths] raw_store`, a folder or a URL, with `[storage]`'s options)."""
        return cls(settings.store_url("raw_store"), settings.storage_options("raw_store"),
                   buckets=settings.compute.merchant_buckets, settings=settings)

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection to read the store in, held to its workspace's budget with spill files under its
        `SCFRISK_HOME` (`core.sql.duckdb_connect`; a Dask worker's own budget on a worker)."""
        return duckdb_connect(self.settings)

    def _file(self, *parts: str) -> str:
        return "/".join([self._path.rstrip("/"), *parts])

    def table_url(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def manifest(self) -> dict[str, Any]:
        """The snapshot readers see: the last batch committed whole (or the pinned one)."""
        if self._pinned is not None:
            return self._pinned
        path = self._file(MANIFEST)
        if not self.fs.isfile(path):
            return dict(EMPTY_MANIFEST)
        manifest = json.loads(self.fs.cat_file(path))
        if "sequence" not in manifest or (manifest["tables"] and "buckets" not in manifest):
            raise ScfriskError(
                f"raw store {self.root} is in an older layout (before Delta Lake, or partitioned by month only); "
                "ingest its batches again into an empty raw store (another SCFRISK_HOME, or after moving this "
                "folder away)"
            )
        return manifest

    def pinned(self) -> RawStore:
        """This store fixed at its current snapshot: what a worker reads while a batch is being staged."""
        return RawStore(self.url, self.storage_options, self.manifest(), self._configured_buckets, self.settings)

    @property
    def snapshot_id(self) -> str | None:
        return self.manifest()["snapshot_id"]

    @property
    def versions(self) -> dict[str, int]:
        """The Delta version of every table in the snapshot."""
        return {name: t["version"] for name, t in self.manifest()["tables"].items()}

    @property
    def buckets(self) -> int:
        """Merchant buckets of the store's layout: the manifest's once it has data, else the configured count."""
        return self.manifest().get("buckets") or self._configured_buckets or DEFAULT_BUCKETS

    def loaded_batch(self) -> str | None:
        """Fingerprint of the batch whose commit made the current snapshot (None if unknown)."""
        return self.manifest().get("batch")

    def source_state(self) -> dict[str, Any]:
        """What the sources committed with their batches (`Transaction.commit`): e.g. a database's watermarks."""
        return dict(self.manifest().get("source_state") or {})

    def at(self, snapshot_id: str) -> RawStore:
        """The store as it was at an earlier snapshot (Delta time travel to the versions it names)."""
        path = self._file(SNAPSHOTS, f"{snapshot_id}.json")
        if not self.fs.isfile(path):
            raise ScfriskError(f"raw store {self.root} has no snapshot {snapshot_id}")
        return RawStore(self.url, self.storage_options, json.loads(self.fs.cat_file(path)), settings=self.settings)

    def has_table(self, name: str) -> bool:
        return self.manifest()["tables"].get(name, {}).get("rows", 0) > 0

    def partitions(self, name: str) -> dict[tuple[str, int], int]:
        """Rows of each stored partition (month, bucket) of a table; empty when it has none."""
        stored = self.manifest()["tables"].get(name, {}).get("partitions", {})
        return {parse_partition_key(key): part["rows"] for key, part in stored.items()}

    def _delta(self, name: str) -> DeltaTable:
        version = self.manifest()["tables"][name]["version"]
        return DeltaTable(self.table_url(name), version=version, storage_options=self.storage_options or None)

    def dataset(self, name: str, buckets: Sequence[int] | None = None,
                months: Sequence[str] | None = None) -> pads.Dataset:
        """The table at the snapshot's version as an Arrow dataset (filters and projections push down to
        its files; the partition columns `month` and `bucket` prune whole files); empty when the table has
        no data. `buckets`: only those buckets' files; `months`: those months' (`register`)."""
        if not self.has_table(name):
            return pads.dataset(pa.schema([*TABLES[name].arrow_schema, *PARTITION_FIELDS]).empty_table())
        return self._delta(name).to_pyarrow_dataset(partitions=_partition_filter(buckets, months),
                                                    filesystem=self._arrow_filesystem(name))

    def _arrow_filesystem(self, name: str) -> pa_fs.FileSystem:
        """The table's folder as an Arrow file system: paths in it are the table's own (`month=.../...`)."""
        return pa_fs.SubTreeFileSystem(self._file(name), storage.arrow_filesystem(self.fs))

    def register(self, con: duckdb.DuckDBPyConnection, name: str, buckets: Sequence[int] | None = None,
                 view: str | None = None, months: Sequence[str] | None = None,
                 during: tuple[str, datetime, datetime] | None = None, partitions: bool = False) -> str:
        """Make the table at the snapshot's version readable in `con` as a view of the same name, or `view`
        (its schema's columns, and `month` and `bucket` when `partitions`); return the view's name. `buckets`:
        only those merchant buckets' files (a worker's share), all when None; `months`: only those months'
        files; `during` (column, start, end): only the files that may hold a time of that column in
        [start, end), by the first and last days the manifest records of each partition (`_time_ranges`).

        On a local disk DuckDB reads the version's Parquet files itself (measured: half the CPU of an Arrow
        dataset scan for the features); elsewhere it scans the Arrow dataset, so no DuckDB extension is
        needed for object storage. Either way filters and projections are pushed down."""
        columns = ", ".join([c.name for c in TABLES[name].columns] + ([MONTH, BUCKET] if partitions else []))
        paths = self._files_during(name, buckets, months, *during) if during and self.has_table(name) else None
        if paths is not None:
            files = [self._file(name, p) for p in paths]
        else:
            files = self._delta(name).file_uris(_partition_filter(buckets, months)) if self.has_table(name) else []
        if files and isinstance(self.root, Path):
            hive = f"true, hive_types = {{'{MONTH}': VARCHAR, '{BUCKET}': SMALLINT}}" if partitions else "false"
            source = _read_parquet(files, hive)
        else:
            dataset = self.dataset(name, buckets, months) if paths is None else pads.dataset(
                paths, schema=pa.schema([*TABLES[name].arrow_schema, *PARTITION_FIELDS]), format="parquet",
                partitioning=pads.partitioning(pa.schema(PARTITION_FIELDS), flavor="hive"),
                filesystem=self._arrow_filesystem(name))
            con.register(f"{view or name}__delta", dataset)
            source = f"{view or name}__delta"
        con.execute(f"CREATE OR REPLACE TEMP VIEW {view or name} AS SELECT {columns} FROM {source}")
        return view or name

    def _files_during(self, name: str, buckets: Sequence[int] | None, months: Sequence[str] | None, column: str,
                      start: datetime, end: datetime) -> list[str]:
        """The snapshot's files (paths in the table) of those buckets and months whose `column` may hold a time
        in [start, end): the partition's first day of it before end and its last day's end after start (none:
        only nulls), or no times recorded (a partition written before they were: kept, the scan decides)."""
        chosen = []
        for key, part in self.manifest()["tables"][name]["partitions"].items():
            month, bucket = parse_partition_key(key)
            if (buckets is not None and bucket not in buckets) or (months is not None and month not in months):
                continue
            times = part.get("times")
            if times is not None:
                if column not in times:
                    continue  # nulls only
                first, last = map(datetime.fromisoformat, times[column].split("/"))
                if first >= end or last + timedelta(days=1) <= start:
                    continue
            chosen.append(_file_name(key, part["sha256"]))
        return chosen

    def changed_partitions(self, before: RawStore) -> dict[str, set[tuple[str, int]]]:
        """Per table, the partitions (month, bucket) whose content differs between `before` and this snapshot."""
        old, new = before.manifest()["tables"], self.manifest()["tables"]
        out = {}
        for name in set(old) | set(new):
            a, b = old.get(name, {}).get("partitions", {}), new.get(name, {}).get("partitions", {})
            out[name] = {parse_partition_key(k) for k in set(a) | set(b)
                         if a.get(k, {}).get("sha256") != b.get(k, {}).get("sha256")}
        return out

    def changed_rows(self, con: duckdb.DuckDBPyConnection, before: RawStore, name: str,
                     partitions: Collection[tuple[str, int]], columns: Collection[str], time: str) -> str:
        """SQL of the rows (`merchant_id`, `time`) of those partitions of a table that differ between `before` and
        this snapshot, either side (a new row, a changed one, a gone one). Views go into `con`.

        A partition whose version here was written over its version in `before` (the usual day: one batch
        between them) has a change file (`stage_partition`): the rows delivered and those they replaced, read
        alone (a superset of the rows that differ: a row delivered again unchanged is in it). Elsewhere (several
        batches between the snapshots, a partition new or gone) both versions are compared in `columns`: each
        row counted +1 now and -1 before by its merchant, time and a hash of the columns, what does not add up
        to 0 changed (one group-by, a sixth of the CPU of EXCEPT ALL both ways on 10M orders; a changed row
        whose 64-bit hash collides with its old one's would be missed)."""
        now_parts = self.manifest()["tables"].get(name, {}).get("partitions", {})
        old_parts = before.manifest()["tables"].get(name, {}).get("partitions", {})
        logged, compared = [], set()
        for month, bucket in sorted(partitions):
            key = partition_key(month, bucket)
            part, was = now_parts.get(key), old_parts.get(key)
            if part and was and part.get("changed_from") == was["sha256"]:
                logged.append(self._file(name, _change_file(key, part["sha256"], was["sha256"])))
            else:
                compared.add((month, bucket))
        selects = []
        if logged:
            selects.append(f"SELECT merchant_id, {time} FROM {self._scan(con, f'{name}__changes', logged)}")
        if compared:
            buckets, months = sorted({b for _, b in compared}), sorted({m for m, _ in compared})
            views = [store.register(con, name, buckets, view=f"{name}__{side}", months=months)
                     for side, store in (("now", self), ("before", before))]
            row = f"merchant_id, {time}, hash({', '.join(sorted(columns))}) AS h"
            rows = " UNION ALL ".join(f"SELECT {row}, {sign} AS s FROM {view}"
                                      for sign, view in zip((1, -1), views, strict=True))
            selects.append(f"SELECT merchant_id, {time} FROM ({rows}) GROUP BY merchant_id, {time}, h "
                           "HAVING sum(s) <> 0")
        return " UNION ALL ".join(selects)

    def _scan(self, con: duckdb.DuckDBPyConnection, view: str, files: Sequence[str]) -> str:
        """Parquet files of the store as a relation of `con` (DuckDB reads them itself on a local disk; elsewhere
        through an Arrow dataset, as `register`)."""
        if isinstance(self.root, Path):
            return _read_parquet(files, "false")
        con.register(view, pads.dataset(files, format="parquet", filesystem=storage.arrow_filesystem(self.fs)))
        return view

    def distinct_values(
        self, name: str, column: str, buckets: Sequence[int] | None = None,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> pa.Array:
        """Every stored value of a column (the domain of foreign keys pointing at it), of those buckets.
        `con`: the DuckDB connection to run it in (one with the caller's memory and thread limits)."""
        with _connection(self, con) as con:
            view = self.register(con, name, buckets)
            values = con.sql(f"SELECT DISTINCT {column} FROM {view}").to_arrow_table().column(0).combine_chunks()
        return values.cast(TABLES[name].column_index[column].type)

    def key_moves(self, name: str, con: duckdb.DuckDBPyConnection, batch_keys: str) -> KeyMoves:
        """Stored rows a batch re-delivers into another partition (its time or merchant changed): they leave
        their old one, unless the delivered row is the older (`TableSpec.changed_at`): then it is stale and
        kept out (a stale row of the same partition is found at staging, `stage_partition`). `batch_keys`: a
        relation of `con` holding the batch's key column and each row's `month`, `bucket` and `changed_at`.
        Key columns only, in DuckDB (which spills to disk a join larger than memory)."""
        if not self.has_table(name):
            return KeyMoves({}, {})
        spec = TABLES[name]
        key = spec.key
        view = self.register(con, name, view=f"{name}__stored", partitions=True)
        moved = con.sql(
            f"SELECT s.{MONTH}, s.{BUCKET}, b.{MONTH} AS b_month, b.{BUCKET} AS b_bucket, s.{key} AS key, "
            f"b.{CHANGED_AT} AS changed FROM {view} s JOIN {batch_keys} b ON s.{key} = b.{key} "
            f"WHERE s.{MONTH} <> b.{MONTH} OR s.{BUCKET} <> b.{BUCKET} ORDER BY key"
        ).to_arrow_table()
        newer: set[Any] = set()
        if moved.num_rows and moved.column("changed").null_count < moved.num_rows:
            stored = self.dataset(name, sorted(set(moved.column(BUCKET).to_pylist())),
                                  sorted(set(moved.column(MONTH).to_pylist()))).to_table(
                filter=pc.field(key).isin(moved.column("key")))
            stored = pa.table({"key": stored.column(key), "stored": spec.changed_at(stored)})
            both = moved.join(stored, "key")
            newer = set(both.filter(pc.greater(both.column("stored"), both.column("changed")))["key"].to_pylist())
        leaving: dict[str, list[Any]] = {}
        stale: dict[str, list[Any]] = {}
        for row in moved.to_pylist():
            if row["key"] in newer:
                stale.setdefault(partition_key(row["b_month"], row["b_bucket"]), []).append(row["key"])
            else:
                leaving.setdefault(partition_key(row[MONTH], row[BUCKET]), []).append(row["key"])
        key_type = spec.column_index[key].type
        return KeyMoves(*({k: pa.array(v, key_type) for k, v in sorted(keys.items())} for keys in (leaving, stale)))

    def stage_partition(
        self, name: str, key: str, rows: pa.Table | None, leaving: pa.Array | None = None, ledger: str | None = None,
        stale: pa.Array | None = None,
    ) -> StagedPartition:
        """Rebuild one partition for a batch: the stored rows, minus those whose key the batch delivers
        (`rows`, validated, keys unique, less the `stale` keys: older than the stored rows) or moves elsewhere
        (`leaving`), plus `rows`; sorted by key, written deterministically and named by its content. Safe in
        any process: it reads only this partition.
        `ledger`: a folder where a note of a new file is written before the file, so that the file of a
        process killed before its batch could remove it is found again (`remove_unreferenced`)."""
        spec = TABLES[name]
        rows = rows.select([c.name for c in spec.columns]).cast(spec.arrow_schema) if rows is not None else None
        old = self.manifest()["tables"].get(name, {}).get("partitions", {}).get(key)
        stored = pq.read_table(self._file(name, _file_name(key, old["sha256"])), filesystem=self.fs) if old else None
        kept_out = 0
        if rows is not None:
            drop = pc.is_in(rows.column(spec.key), value_set=stale) if stale is not None else None
            if stored is not None and UPDATED_AT in spec.column_index:  # delivered rows older than the stored
                same = stored.take(pc.index_in(rows.column(spec.key), value_set=stored.column(spec.key)
                                               .combine_chunks()))
                older = pc.fill_null(pc.greater(spec.changed_at(same), spec.changed_at(rows)), False)
                drop = older if drop is None else pc.or_(drop, older)
            if drop is not None:
                kept_out = pc.sum(drop).as_py() or 0
                rows = rows.filter(pc.invert(drop))
        parts = [rows] if rows is not None else []
        replaced = None
        if stored is not None:
            gone = [a for a in (rows.column(spec.key).combine_chunks() if rows is not None else None, leaving)
                    if a is not None]
            if gone:
                drop = pc.is_in(stored.column(spec.key), value_set=pa.concat_arrays([a.cast(stored.schema.field(
                    spec.key).type) for a in gone]))
                replaced = stored.filter(drop)
                stored = stored.filter(pc.invert(drop))
            parts.insert(0, stored.select([c.name for c in spec.columns]).cast(spec.arrow_schema))
        merged = pa.concat_tables(parts).sort_by(spec.key) if parts else spec.arrow_schema.empty_table()
        if merged.num_rows == 0:
            return StagedPartition(name, key, {}, stale=kept_out)
        # One chunk per column, so the bytes depend on the rows only, not on how they were read.
        sink = pa.BufferOutputStream()
        pq.write_table(merged.combine_chunks(), sink, compression="zstd", row_group_size=1 << 20)
        data = sink.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        entry = {"rows": merged.num_rows, "sha256": digest, **_time_ranges(merged, spec.timestamp_columns)}
        if old and old["sha256"] == digest:
            return StagedPartition(name, key, entry, stale=kept_out)
        path = self._file(name, _file_name(key, digest))
        written = None
        if not self.fs.exists(path):  # else the same bytes, kept by an older version
            if ledger is not None:
                self.fs.makedirs(ledger, exist_ok=True)
                self.fs.pipe_file(f"{ledger}/{name}.{key.replace('/', '.')}.{digest}", b"")
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, data)
            written = path
        if old:  # the rows delivered and those they replace or move away: what differs from the old version
            schema = _change_schema(spec)
            changes = pa.concat_tables([t.select(schema.names).cast(schema) for t in (rows, replaced) if t is not None])
            sink = pa.BufferOutputStream()
            pq.write_table(changes, sink, compression="zstd")
            change_file = self._file(name, _change_file(key, digest, old["sha256"]))
            if ledger is not None:
                self.fs.makedirs(ledger, exist_ok=True)
                self.fs.pipe_file(f"{ledger}/{name}.{key.replace('/', '.')}.{digest}.{old['sha256']}", b"")
            self.fs.makedirs(change_file.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(change_file, sink.getvalue().to_pybytes())
            entry["changed_from"] = old["sha256"]
        month, bucket = parse_partition_key(key)
        add = {
            "path": _file_name(key, digest), "size": len(data),
            "partition_values": {MONTH: month, BUCKET: str(bucket)},
            "modification_time": int(time.time() * 1000), "data_change": True,
            "stats": json.dumps({"numRecords": merged.num_rows}),
        }
        return StagedPartition(name, key, entry, add, written, kept_out)

    def remove_unreferenced(self, ledger: str) -> None:
        """Remove the partition files and change files a ledger notes (`stage_partition`) that the current
        snapshot does not hold: written for a batch that never committed (the caller removes the ledger). Left
        alone while a commit cut short waits for `recover` (it needs them; once finished, its snapshot holds
        them)."""
        if not self.fs.exists(ledger) or self.fs.isfile(self._file(JOURNAL)):
            return
        manifest = RawStore(self.url, self.storage_options).manifest()  # the live one, whatever this is pinned to
        for note in self.fs.ls(ledger, detail=False):
            name, month, bucket, digest, *old = note.rsplit("/", 1)[1].split(".")
            key = f"{month}/{bucket}"
            part = _partition(manifest, name, key)
            if old:
                path = self._file(name, _change_file(key, digest, old[0]))
                held = (part.get("sha256"), part.get("changed_from")) == (digest, old[0])
            else:
                path, held = self._file(name, _file_name(key, digest)), part.get("sha256") == digest
            if not held and self.fs.exists(path):  # killed before it wrote it
                self.fs.rm_file(path)

    def recover(self) -> bool:
        """Roll an interrupted commit forward from its journal; True if there was one to finish."""
        if self._pinned is not None or not self.fs.isfile(self._file(JOURNAL)):
            return False
        log.warning("raw store %s: finishing a commit that was interrupted", self.root)
        self._apply_journal()
        return True

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """Every snapshot `at` can return, by id, oldest first (by sequence): its manifest, with `committed_at`,
        the time its record was written (the moment it became the store's current snapshot), and the bytes of
        that record (`record_bytes`)."""
        folder = self._file(SNAPSHOTS)
        if not self.fs.exists(folder):
            return {}
        found = []
        for info in self.fs.ls(folder, detail=True):
            if info["name"].endswith(".json"):
                manifest = json.loads(self.fs.cat_file(info["name"]))
                found.append({**manifest, "committed_at": modified_time(info), "record_bytes": int(info["size"])})
        return {m["snapshot_id"]: m for m in sorted(found, key=lambda m: m["sequence"])}

    def vacuum(self, protected: Collection[str], cutoff: datetime, dry_run: bool = False) -> Vacuum:
        """Remove the data files that no snapshot kept needs; the records of the snapshots not kept.

        Kept: the current snapshot, the `protected` ones (a model's training data), every snapshot that was
        current at some time after `cutoff` (those committed after it, and the one current at it), and what the
        table's latest Delta version holds. A data file goes only if none of the kept snapshots' Delta versions
        lists it and it was written before `cutoff` (a file younger than that may be a batch's being staged).

        Why not Delta's own `vacuum(retention_hours, keep_versions=...)`: its threshold is on when a file was
        removed, not on which snapshot a reader may ask for (the window is the manifest's, which spans several
        tables' versions), and its default mode only sees the removals logged since the last checkpoint, so
        files removed before one would stay for ever. Here the files of each kept version are Delta's own
        list (its add actions): every kept version is loaded first, so a version that can no longer be read
        stops the vacuum before anything is removed (the store keeps its log whole: `KEEP_LOG`).

        One writer at a time: refused while an ingest is staging or a commit waits to be finished."""
        if self._pinned is not None:
            raise ScfriskError(f"raw store {self.root} is pinned to snapshot {self.snapshot_id}: read only")
        if self.fs.isfile(self._file(JOURNAL)) or self.fs.exists(self._file(STAGING)):
            raise ScfriskError(f"raw store {self.root}: an ingest is running, or was cut short (the next ingest "
                               "finishes or clears it); vacuum once no ingest runs")
        snapshots = self.snapshots()
        current = self.snapshot_id
        gone = sorted(set(protected) - set(snapshots))
        if gone:
            log.warning("raw store %s no longer has snapshot(s) %s: they cannot be re-read", self.root, ", ".join(gone))
        kept = {s for s in protected if s in snapshots} | ({current} if current else set())
        settled = [s for s, m in snapshots.items() if m["committed_at"] <= cutoff]
        kept |= {s for s, m in snapshots.items() if m["committed_at"] > cutoff} | set(settled[-1:])
        tables = sorted({name for m in snapshots.values() for name in m["tables"]} | set(self.manifest()["tables"]))
        doomed: dict[str, int] = {}
        for name in tables:
            doomed |= self._unreferenced(name, {snapshots[s]["tables"][name]["version"] for s in kept
                                                if s in snapshots and name in snapshots[s]["tables"]}, cutoff)
        dropped = [s for s in snapshots if s not in kept]
        records = {self._file(SNAPSHOTS, f"{s}.json"): snapshots[s]["record_bytes"] for s in dropped}
        if not dry_run:
            # Records first: a vacuum cut short leaves files no record names, which the next one removes.
            for record in records:
                self.fs.rm_file(record)
            if doomed:
                self.fs.rm(sorted(doomed))
        return Vacuum([s for s in snapshots if s in kept], dropped, {**records, **doomed})

    def _unreferenced(self, name: str, versions: set[int], cutoff: datetime) -> dict[str, int]:
        """The data files of a table older than `cutoff` that none of `versions` nor its latest version lists."""
        url, options = self.table_url(name), self.storage_options or None
        if not DeltaTable.is_deltatable(url, options):
            return {}
        versions = versions | {DeltaTable(url, storage_options=options).version()}
        listed: set[str] = set()
        for version in sorted(versions):
            try:
                adds = DeltaTable(url, version=version, storage_options=options).get_add_actions().column("path")
            except (DeltaError, OSError) as exc:
                raise ScfriskError(f"raw store {self.root}: table {name} version {version}, which a snapshot kept "
                                   f"needs, cannot be loaded ({str(exc).splitlines()[0]}); nothing was removed"
                                   ) from exc
            listed.update(unquote(path) for path in adds.to_pylist())  # the log's paths are URL-encoded
        folder = self._file(name)
        out = {}
        for path, info in self.fs.find(folder, detail=True).items():
            relative = path[len(folder.rstrip("/")) + 1:]
            if relative.startswith(f"{CHANGES}/"):  # a change file goes with the partition file it leads to
                relative = relative.removeprefix(f"{CHANGES}/").split(".from-")[0] + ".parquet"
            elif any(part.startswith(("_", ".")) for part in relative.split("/")):
                continue  # the Delta log, and anything that is not a data file
            if relative not in listed and modified_time(info) < cutoff:
                out[path] = int(info["size"])
        return out

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A batch write: stage partitions, then `commit`; uncommitted files never outlive it."""
        if self._pinned is not None:
            raise ScfriskError(f"raw store {self.root} is pinned to snapshot {self.snapshot_id}: read only")
        self.recover()
        stored = self.manifest().get("buckets")
        if stored and self._configured_buckets and stored != self._configured_buckets:
            log.warning("raw store %s keeps its %d merchant buckets (its layout); the setting of %d is ignored",
                        self.root, stored, self._configured_buckets)
        batch = Transaction(self)
        try:
            yield batch
        finally:
            if not batch.committed and not self.fs.isfile(self._file(JOURNAL)):  # a journal needs its files
                for path in batch.written:
                    if self.fs.exists(path):  # else removed already, from a ledger (`remove_unreferenced`)
                        self.fs.rm_file(path)

    def _apply_journal(self) -> None:
        """Commit each table of the journal (skipping any that already has it), then the manifest."""
        plan = json.loads(self.fs.cat_file(self._file(JOURNAL)))
        manifest = plan["manifest"]
        for name, entry in plan["tables"].items():
            manifest["tables"][name]["version"] = self._commit_table(name, entry, manifest["sequence"])
        manifest["snapshot_id"] = _snapshot_id(manifest["tables"])
        self.fs.makedirs(self._file(SNAPSHOTS), exist_ok=True)
        _write_json(self.fs, self._file(SNAPSHOTS, f"{manifest['snapshot_id']}.json"), manifest)
        _write_json(self.fs, self._file(MANIFEST), manifest)
        self.fs.rm_file(self._file(JOURNAL))

    def _commit_table(self, name: str, entry: Mapping[str, Any], sequence: int) -> int:
        """One Delta commit removing the touched partitions' old files and adding the staged ones; its version."""
        url, options = self.table_url(name), self.storage_options or None
        adds = [AddAction(**add) for add in entry["adds"]]
        schema = DeltaSchema.from_arrow(pa.schema([*TABLES[name].arrow_schema, *PARTITION_FIELDS]))
        props = CommitProperties(app_transactions=[AppTransaction(APP_ID, sequence)])
        if not DeltaTable.is_deltatable(url, options):
            create_table_with_add_actions(
                url, schema, adds, mode="error", partition_by=[MONTH, BUCKET], storage_options=options,
                configuration=TABLE_CONFIGURATION, commit_properties=props, post_commithook_properties=KEEP_LOG,
            )
        else:
            table = DeltaTable(url, storage_options=options)
            if (table.transaction_version(APP_ID) or 0) >= sequence:
                return table.version()  # committed before the interruption
            now = int(time.time() * 1000)
            removes = [RemoveAction(path, True, now, partition_values=_partition_values(path))
                       for path in entry["removes"]]
            table.create_write_transaction(
                [*removes, *adds], "append", schema, partition_by=[MONTH, BUCKET], commit_properties=props,
                post_commithook_properties=KEEP_LOG,
            )
        return DeltaTable(url, storage_options=options).version()


class Transaction:
    """The partitions of one batch staged so far; `commit` commits every changed table, manifest last."""

    def __init__(self, store: RawStore) -> None:
        self.store = store
        self.staged: dict[str, dict[str, StagedPartition]] = {}
        self.written: list[str] = []
        """Files this batch created: removed again unless it commits."""
        self.committed = False

    def add(self, staged: Sequence[StagedPartition]) -> None:
        """Take partitions staged anywhere (`RawStore.stage_partition`) into the batch."""
        for part in staged:
            self.staged.setdefault(part.table, {})[part.key] = part
            if part.written:
                self.written.append(part.written)

    def stage(self, name: str, table: pa.Table) -> None:
        """Stage a whole validated table held in memory (schema-conformed, keys unique): every partition it
        touches, and those its rows leave. The ingest stages partition by partition instead."""
        spec, store = TABLES[name], self.store
        parts = split_by_partition(table, spec.time_column, store.buckets)
        keys = pa.concat_tables([
            pa.table({spec.key: rows.column(spec.key), MONTH: [month] * len(rows), BUCKET: [bucket] * len(rows),
                      CHANGED_AT: spec.changed_at(rows)})
            for (month, bucket), rows in ((parse_partition_key(k), rows) for k, rows in parts.items())
        ]) if parts else None
        moves = KeyMoves({}, {})
        if keys is not None:
            with _connection(store, None) as con:
                con.register("batch_keys", keys)
                moves = store.key_moves(name, con, "batch_keys")
        self.add([store.stage_partition(name, key, parts.get(key), moves.leaving.get(key), None,
                                        moves.stale.get(key))
                  for key in sorted({*parts, *moves.leaving})])

    def commit(
        self, batch: str | None = None, source_state: Mapping[str, Any] | None = None
    ) -> dict[str, list[str]]:
        """Commit the staged tables; return the partitions rewritten per table.

        `batch` (a fingerprint of the batch's data and rules) is recorded as the one that made the snapshot:
        `loaded_batch` then tells a caller that re-ingesting it would change nothing. That holds too when
        this batch changed nothing (its data already stored, checked by rules that changed since).
        `source_state` (keys merged over the stored ones, `RawStore.source_state`) is written in the same
        manifest, so a source's watermarks move only when its batch commits.
        """
        old = self.store.manifest()
        changed = {
            name: sorted(k for k, part in parts.items() if _entry(old, name, k) != part.entry.get("sha256"))
            for name, parts in self.staged.items()
        }
        state = {**(old.get("source_state") or {}), **(source_state or {})}
        if any(changed.values()):
            tables = {
                name: {
                    "adds": [self.staged[name][k].add for k in keys if self.staged[name][k].add],
                    "removes": [_file_name(k, sha) for k in keys if (sha := _entry(old, name, k))],
                }
                for name, keys in changed.items() if keys
            }
            manifest = _next_manifest(
                old, {name: {k: p.entry for k, p in parts.items()} for name, parts in self.staged.items()}
            )
            manifest.update(batch=batch, buckets=self.store.buckets, source_state=state)
            _write_json(self.store.fs, self.store._file(JOURNAL), {"tables": tables, "manifest": manifest})
            self.store._apply_journal()
        elif (batch is not None and old.get("batch") != batch) or state != (old.get("source_state") or {}):
            _write_json(self.store.fs, self.store._file(MANIFEST), {**old, "batch": batch, "source_state": state})
        self.committed = True
        return changed


@contextmanager
def _connection(store: RawStore, con: duckdb.DuckDBPyConnection | None) -> Iterator[duckdb.DuckDBPyConnection]:
    """The caller's connection, or one of the store's own (`RawStore.connect`) closed after use."""
    if con is not None:
        yield con
        return
    own = store.connect()
    try:
        yield own
    finally:
        own.close()


def _write_json(fs: fsspec.AbstractFileSystem, path: str, content: dict[str, Any]) -> None:
    """Write whole or not at all (a reader never sees a half-written file): one PUT on object storage,
    a rename on a local disk."""
    data = (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()
    if "file" not in fs.protocol:
        fs.pipe_file(path, data)
        return
    fs.pipe_file(path + ".tmp", data)
    fs.mv(path + ".tmp", path)


def _time_ranges(table: pa.Table, columns: Sequence[str]) -> dict[str, Any]:
    """A partition's first and last day of each time column that holds one, as an ISO 8601 interval
    "first/last" (one short line of the manifest: days, since a refresh reads whole days), so that a reader
    of the rows of a time range opens only the files that may hold it (`RawStore.register`'s `during`). In
    the manifest, not in the Delta log's statistics: delta-rs turns statistics of some columns only into a
    guarantee that no row of the file matches a filter on any other column."""
    times = {}
    for name in columns:
        bounds = pc.min_max(table.column(name))
        if bounds["min"].is_valid:
            times[name] = f"{bounds['min'].as_py():%Y-%m-%d}/{bounds['max'].as_py():%Y-%m-%d}"
    return {"times": times} if columns else {}


def _read_parquet(files: Sequence[str], hive: str) -> str:
    """DuckDB's scan of local Parquet files, `hive` its `hive_partitioning` option."""
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return f"read_parquet([{listed}], hive_partitioning = {hive})"


def _change_schema(spec: TableSpec) -> pa.Schema:
    """The columns a change file keeps: the merchant and every time (what a reader maps a row to a day by)."""
    return pa.schema([spec.arrow_schema.field(c) for c in ("merchant_id", *spec.timestamp_columns)])


def _file_name(key: str, digest: str) -> str:
    """A partition file's path in its table: in the partition's folder, named by its content."""
    return f"{key}/part-{digest[:32]}.parquet"


def _change_file(key: str, digest: str, old_digest: str) -> str:
    """The path in its table of the change file from one version of a partition to another: named by both
    (a version reached again from another one has other changes)."""
    return f"{CHANGES}/{_file_name(key, digest).removesuffix('.parquet')}.from-{old_digest[:32]}.parquet"


def _partition_values(path: str) -> dict[str, str | None]:
    month, bucket = parse_partition_key(path.rsplit("/", 1)[0])
    return {MONTH: month, BUCKET: str(bucket)}


def _partition_filter(buckets: Sequence[int] | None,
                      months: Sequence[str] | None = None) -> list[tuple[str, str, Any]] | None:
    chosen = [] if buckets is None else [(BUCKET, "in", [str(b) for b in buckets])]
    chosen += [] if months is None else [(MONTH, "in", list(months))]
    return chosen or None


def _partition(manifest: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    """A partition's entry in a manifest (empty when it has none)."""
    return manifest["tables"].get(name, {}).get("partitions", {}).get(key, {})


def _entry(manifest: dict[str, Any], name: str, key: str) -> str | None:
    return _partition(manifest, name, key).get("sha256")


def _next_manifest(old: dict[str, Any], staged: Mapping[str, Mapping[str, dict[str, Any]]]) -> dict[str, Any]:
    """The manifest after the commit, but for the versions of the tables it commits."""
    tables = json.loads(json.dumps(old["tables"]))
    for name, parts in staged.items():
        partitions = tables.setdefault(name, {"partitions": {}, "version": None})["partitions"]
        for key, part in parts.items():
            if part:
                partitions[key] = part
            else:
                partitions.pop(key, None)
        tables[name]["partitions"] = dict(sorted(partitions.items()))
        tables[name]["rows"] = sum(p["rows"] for p in partitions.values())
        if tables[name]["version"] is None and not partitions:  # delivered empty, never stored: no table
            del tables[name]
    return {**old, "snapshot_id": None, "sequence": old.get("sequence", 0) + 1, "tables": dict(sorted(tables.items()))}


def _snapshot_id(tables: Mapping[str, Any]) -> str:
    """Hash of every table's version and every partition's content hash."""
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]
