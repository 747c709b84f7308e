"""The validated raw store: one Delta Lake table per raw table, `<root>/<table>`, partitioned by month.

Every table is partitioned by the month of its own time column (see `core.schemas`; the partition
column `month` is Delta's, readers never see it). The store is addressed by a URL (`file://`, `s3://`, ...;
a plain path is a local folder): the data and its commits go through Delta Lake (delta-rs), whose commit is
atomic on object storage too, where a rename is a copy and a delete.

A Delta commit covers one table, a batch several. So readers do not read a table's latest version: the
manifest `_manifest.json`, written last by a batch (one PUT, whole or not at all), names the version of
every table, and readers are pinned to those. Its `snapshot_id` hashes those versions with each partition's
content hash: it changes exactly when the data does, so downstream stages can reuse work computed on the
same snapshot, and a model that records it can re-read that very data (`RawStore.at`, Delta time travel:
every manifest is also kept under `_snapshots/<id>.json`). It also names the batch (a fingerprint of its
files) whose commit made that snapshot, so the same batch is not ingested twice.

Writes are all or nothing and incremental. Staging a table rebuilds every partition the batch touches
(upserted by the table's key, sorted by it, written deterministically and named by its content) as a
Parquet file beside the table's data, not yet committed, so invisible. Only after the whole batch has
passed does `commit` write a journal (each table's files and months), commit each table (a Delta overwrite
of exactly the touched partitions: the copy-on-write form of a MERGE by key), then the manifest. A crash
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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions
from deltalake.transaction import Transaction as AppTransaction

from core.errors import ScfriskError
from core.schemas import TABLES, TableSpec

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SNAPSHOTS = "_snapshots"
JOURNAL = "_commit.json"
PARTITION = "month"
APP_ID = "scfrisk-raw-store"
"""Delta transaction id of the store's batches: a table's commit records the batch's sequence number."""

EMPTY_MANIFEST: dict[str, Any] = {"snapshot_id": None, "sequence": 0, "tables": {}}


class RawStore:
    """A raw store: the snapshot readers are pinned to, plus the transactional batch write."""

    def __init__(
        self,
        root: Path | str,
        storage_options: Mapping[str, str] | None = None,
        snapshot: Mapping[str, Any] | None = None,
    ) -> None:
        """`root`: a folder or a URL; `storage_options` go to both fsspec and delta-rs (credentials are
        usually better left to the `AWS_*` environment); `snapshot` pins reads to a past manifest."""
        text = str(root)
        local = "://" not in text or text.startswith("file://")
        self.root: Path | str = Path(unquote(text.removeprefix("file://"))) if local else text
        self.url = str(Path(self.root).absolute()) if local else text
        """Where fsspec and delta-rs find the store: an absolute path on a local disk, else the URL."""
        self.storage_options = dict(storage_options or {})
        self.fs, self._path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._pinned = dict(snapshot) if snapshot is not None else None

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
        if "sequence" not in manifest:
            raise ScfriskError(
                f"raw store {self.root} is in the layout before Delta Lake; ingest its batches again into an "
                "empty raw store (another SCFRISK_HOME, or after moving this folder away)"
            )
        return manifest

    @property
    def snapshot_id(self) -> str | None:
        return self.manifest()["snapshot_id"]

    @property
    def versions(self) -> dict[str, int]:
        """The Delta version of every table in the snapshot."""
        return {name: t["version"] for name, t in self.manifest()["tables"].items()}

    def loaded_batch(self) -> str | None:
        """Fingerprint of the batch whose commit made the current snapshot (None if unknown)."""
        return self.manifest().get("batch")

    def at(self, snapshot_id: str) -> RawStore:
        """The store as it was at an earlier snapshot (Delta time travel to the versions it names)."""
        path = self._file(SNAPSHOTS, f"{snapshot_id}.json")
        if not self.fs.isfile(path):
            raise ScfriskError(f"raw store {self.root} has no snapshot {snapshot_id}")
        return RawStore(self.url, self.storage_options, json.loads(self.fs.cat_file(path)))

    def has_table(self, name: str) -> bool:
        return self.manifest()["tables"].get(name, {}).get("rows", 0) > 0

    def _delta(self, name: str) -> DeltaTable:
        version = self.manifest()["tables"][name]["version"]
        return DeltaTable(self.table_url(name), version=version, storage_options=self.storage_options or None)

    def dataset(self, name: str) -> pads.Dataset:
        """The table at the snapshot's version as an Arrow dataset (filters and projections push down to
        its files; the `month` partition column prunes whole files); empty when the table has no data."""
        if not self.has_table(name):
            return pads.dataset(TABLES[name].arrow_schema.empty_table())
        filesystem, path = pa_fs.FileSystem.from_uri(self.table_url(name))
        return self._delta(name).to_pyarrow_dataset(filesystem=pa_fs.SubTreeFileSystem(path, filesystem))

    def register(self, con: duckdb.DuckDBPyConnection, name: str) -> str:
        """Make the table at the snapshot's version readable in `con` as a view of the same name (its
        schema's columns, no partition column); return the name.

        On a local disk DuckDB reads the version's Parquet files itself (measured: half the CPU of an Arrow
        dataset scan for the features); elsewhere it scans the Arrow dataset, so no DuckDB extension is
        needed for object storage. Either way filters and projections are pushed down."""
        columns = ", ".join(c.name for c in TABLES[name].columns)
        if self.has_table(name) and isinstance(self.root, Path):
            files = ", ".join("'" + f.replace("'", "''") + "'" for f in self._delta(name).file_uris())
            source = f"read_parquet([{files}], hive_partitioning = false)"
        else:
            con.register(f"{name}__delta", self.dataset(name))
            source = f"{name}__delta"
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {columns} FROM {source}")
        return name

    def distinct_values(self, name: str, column: str) -> pa.Array:
        """Every stored value of a column (the domain of foreign keys pointing at it)."""
        con = duckdb.connect()
        view = self.register(con, name)
        values = con.sql(f"SELECT DISTINCT {column} FROM {view}").to_arrow_table().column(0).combine_chunks()
        con.close()
        return values.cast(TABLES[name].column_index[column].type)

    def recover(self) -> bool:
        """Roll an interrupted commit forward from its journal; True if there was one to finish."""
        if self._pinned is not None or not self.fs.isfile(self._file(JOURNAL)):
            return False
        log.warning("raw store %s: finishing a commit that was interrupted", self.root)
        self._apply_journal()
        return True

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A batch write: stage tables one at a time, then `commit`; uncommitted files never outlive it."""
        if self._pinned is not None:
            raise ScfriskError(f"raw store {self.root} is pinned to snapshot {self.snapshot_id}: read only")
        self.recover()
        batch = Transaction(self)
        try:
            yield batch
        finally:
            if not batch.committed and not self.fs.isfile(self._file(JOURNAL)):  # a journal needs its files
                for path in batch.written:
                    self.fs.rm_file(path)

    def _stage(self, spec: TableSpec, table: pa.Table, batch: Transaction) -> dict[str, Any]:
        """Rebuild every partition the batch touches, writing the changed ones; an emptied partition maps
        to {}. One pass over the batch: its rows ordered by (month, key) once, then taken one month at a
        time (a month's copy is the extra memory)."""
        table = table.select([c.name for c in spec.columns]).cast(spec.arrow_schema)
        time_ = table.column(spec.time_column)
        month_ids = pc.add(pc.multiply(pc.year(time_), 12), pc.subtract(pc.month(time_), 1))
        order = pc.sort_indices(
            pa.table({"month": month_ids, "key": table.column(spec.key)}),
            sort_keys=[("month", "ascending"), ("key", "ascending")],
        )
        sorted_ids = month_ids.take(order).to_numpy()
        ids, starts = np.unique(sorted_ids, return_index=True)
        stops = [*starts[1:], len(sorted_ids)][:len(starts)]  # none for a table delivered empty
        rows = {_month(i): order[start:stop] for i, start, stop in zip(ids, starts, stops, strict=True)}
        stored = self.manifest()["tables"].get(spec.name, {}).get("partitions", {})
        con = duckdb.connect()
        con.register("batch_keys", table.select([spec.key]))
        if stored:
            con.register("stored", self.dataset(spec.name))
            # A re-delivered row whose time moved to another month must leave its old partition.
            moved = con.sql(
                f"SELECT DISTINCT s.{PARTITION} FROM stored s SEMI JOIN batch_keys b ON s.{spec.key} = b.{spec.key}"
            ).fetchall()
            rows.update({m: order[:0] for (m,) in moved if m not in rows})
        partitions: dict[str, dict[str, Any]] = {}
        adds: list[dict[str, Any]] = []
        for m, indices in sorted(rows.items()):
            merged = table.take(indices)
            if m in stored:
                kept = con.sql(
                    f"SELECT {', '.join(table.column_names)} FROM stored s "
                    f"ANTI JOIN batch_keys b ON s.{spec.key} = b.{spec.key} WHERE s.{PARTITION} = '{m}'"
                ).to_arrow_table()
                merged = pa.concat_tables([kept.cast(spec.arrow_schema), merged]).sort_by(spec.key)
            if merged.num_rows == 0:
                partitions[m] = {}
                continue
            # One chunk per column, so the bytes depend on the rows only, not on how they were read.
            sink = pa.BufferOutputStream()
            pq.write_table(merged.combine_chunks(), sink, compression="zstd", row_group_size=1 << 20)
            data = sink.getvalue().to_pybytes()
            digest = hashlib.sha256(data).hexdigest()
            partitions[m] = {"rows": merged.num_rows, "sha256": digest}
            if stored.get(m, {}).get("sha256") != digest:
                adds.append(batch.write_file(spec.name, m, data, digest, merged.num_rows))
        con.close()
        return {"partitions": partitions, "adds": adds}

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
        """One Delta commit replacing the touched partitions by the staged files; its version."""
        url, options = self.table_url(name), self.storage_options or None
        adds = [AddAction(**add) for add in entry["adds"]]
        schema = DeltaSchema.from_arrow(TABLES[name].arrow_schema.append(pa.field(PARTITION, pa.string())))
        props = CommitProperties(app_transactions=[AppTransaction(APP_ID, sequence)])
        if not DeltaTable.is_deltatable(url, options):
            create_table_with_add_actions(
                url, schema, adds, mode="error", partition_by=[PARTITION], storage_options=options,
                commit_properties=props,
            )
        else:
            table = DeltaTable(url, storage_options=options)
            if (table.transaction_version(APP_ID) or 0) >= sequence:
                return table.version()  # committed before the interruption
            table.create_write_transaction(
                adds, "overwrite", schema, partition_by=[PARTITION],
                partition_filters=[(PARTITION, "in", entry["months"])], commit_properties=props,
            )
        return DeltaTable(url, storage_options=options).version()


class Transaction:
    """The tables of one batch staged so far; `commit` commits every changed table, manifest last."""

    def __init__(self, store: RawStore) -> None:
        self.store = store
        self.staged: dict[str, dict[str, Any]] = {}
        self.written: list[str] = []
        """Files this batch created: removed again unless it commits."""
        self.committed = False

    def stage(self, name: str, table: pa.Table) -> None:
        """Write a validated table's changed partitions beside its data (schema-conformed, keys unique)."""
        self.staged[name] = self.store._stage(TABLES[name], table, self)

    def write_file(self, name: str, month: str, data: bytes, digest: str, rows: int) -> dict[str, Any]:
        """Put a partition's file (named by its content, so a rerun writes the same one); its add action."""
        relative = f"{PARTITION}={month}/part-{digest[:32]}.parquet"
        path = self.store._file(name, relative)
        if not self.store.fs.exists(path):  # else the same bytes, kept by an older version
            self.store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.store.fs.pipe_file(path, data)
            self.written.append(path)
        return {
            "path": relative, "size": len(data), "partition_values": {PARTITION: month},
            "modification_time": int(time.time() * 1000), "data_change": True,
            "stats": json.dumps({"numRecords": rows}),
        }

    def commit(self, batch: str | None = None) -> dict[str, list[str]]:
        """Commit the staged tables; return the months rewritten per table.

        `batch` (a fingerprint of the batch's files and rules) is recorded as the one that made the snapshot:
        `loaded_batch` then tells a caller that re-ingesting it would change nothing. That holds too when
        this batch changed nothing (its data already stored, checked by rules that changed since).
        """
        old = self.store.manifest()
        changed = {
            name: [m for m, part in s["partitions"].items() if _entry(old, name, m) != part.get("sha256")]
            for name, s in self.staged.items()
        }
        if any(changed.values()):
            tables = {name: {"months": changed[name], "adds": s["adds"]} for name, s in self.staged.items()
                      if changed[name]}
            manifest = _next_manifest(old, {name: s["partitions"] for name, s in self.staged.items()})
            manifest["batch"] = batch
            _write_json(self.store.fs, self.store._file(JOURNAL), {"tables": tables, "manifest": manifest})
            self.store._apply_journal()
        elif batch is not None and old.get("batch") != batch:
            _write_json(self.store.fs, self.store._file(MANIFEST), {**old, "batch": batch})
        self.committed = True
        return changed


def _write_json(fs: fsspec.AbstractFileSystem, path: str, content: dict[str, Any]) -> None:
    """Write whole or not at all (a reader never sees a half-written file): one PUT on object storage,
    a rename on a local disk."""
    data = (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()
    if "file" not in fs.protocol:
        fs.pipe_file(path, data)
        return
    fs.pipe_file(path + ".tmp", data)
    fs.mv(path + ".tmp", path)


def _month(month_id: int) -> str:
    return f"{month_id // 12:04d}-{month_id % 12 + 1:02d}"


def _entry(manifest: dict[str, Any], name: str, month: str) -> str | None:
    return manifest["tables"].get(name, {}).get("partitions", {}).get(month, {}).get("sha256")


def _next_manifest(old: dict[str, Any], staged: Mapping[str, Mapping[str, dict[str, Any]]]) -> dict[str, Any]:
    """The manifest after the commit, but for the versions of the tables it commits."""
    tables = json.loads(json.dumps(old["tables"]))
    for name, parts in staged.items():
        partitions = tables.setdefault(name, {"partitions": {}, "version": None})["partitions"]
        for month, part in parts.items():
            if part:
                partitions[month] = part
            else:
                partitions.pop(month, None)
        tables[name]["partitions"] = dict(sorted(partitions.items()))
        tables[name]["rows"] = sum(p["rows"] for p in partitions.values())
        if tables[name]["version"] is None and not partitions:  # delivered empty, never stored: no table
            del tables[name]
    return {"snapshot_id": None, "sequence": old.get("sequence", 0) + 1, "tables": dict(sorted(tables.items()))}


def _snapshot_id(tables: Mapping[str, Any]) -> str:
    """Hash of every table's version and every partition's content hash."""
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]
