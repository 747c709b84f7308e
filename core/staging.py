"""A batch cut into the raw store's partitions before it is validated: one pass over the source, in bounded
memory, so that each partition can then be validated and written by any worker on its own.

The source's record batches are split by partition (`core.partitioning`) and appended to Arrow IPC files
(lz4: cheap to write and to read back, and a column can be read alone) under the raw store's
`_staging/<token>/<table>/<month>.<bucket>.<n>.arrow`, where every worker that reads the store reads them
too (one folder per table: a folder per partition made removing them cost more than writing them).
A batch's columns are kept as delivered (after `conform`), so a badly typed column still reaches
validation; when a later record batch of a table brings other types, the partition gets another file.
The folder is removed when the ingest ends, passed or not; one left by a killed ingest is removed by the next.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pa_fs

from core.partitioning import BUCKET, MONTH, parse_partition_key, split_by_partition
from core.raw_store import RawStore
from core.schemas import TABLES

STAGING = "_staging"
IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


@dataclass
class StagedTable:
    """Where one table of the batch went: its files per partition, and how many rows each holds."""

    files: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    typed_columns: set[str] | None = None
    """Columns that have their schema type in every record batch (None before the first one)."""

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


class BatchSpill:
    """The batch's rows by table and partition, in files beside the raw store."""

    def __init__(self, store: RawStore, token: str | None = None) -> None:
        self.store = store
        self.root = store._file(STAGING, token or uuid.uuid4().hex)
        self.tables: dict[str, StagedTable] = {}
        # Arrow's own file system on a local disk (fsspec's costs a Python call per read and write).
        self.filesystem = pa_fs.LocalFileSystem() if isinstance(store.root, Path) else pa_fs.PyFileSystem(
            pa_fs.FSSpecHandler(store.fs))

    @staticmethod
    def clear_leftovers(store: RawStore) -> None:
        """Remove what a killed ingest left (one writer at a time: nothing else is staging)."""
        if store.fs.exists(store._file(STAGING)):
            store.fs.rm(store._file(STAGING), recursive=True)

    def add(self, name: str, batches: Iterable[pa.RecordBatch], buckets: int) -> StagedTable:
        """Split a table's record batches into partition files; memory is one record batch and a write
        buffer per open partition."""
        spec, staged = TABLES[name], self.tables.setdefault(name, StagedTable())
        writers: dict[str, tuple[pa.Schema, Any, Any]] = {}
        self.filesystem.create_dir(f"{self.root}/{name}", recursive=True)
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                typed = {c.name for c in spec.columns if c.name in batch.schema.names
                         and batch.schema.field(c.name).type == c.type}
                staged.typed_columns = typed if staged.typed_columns is None else staged.typed_columns & typed
                for key, rows in split_by_partition(pa.Table.from_batches([batch]), spec.time_column, buckets).items():
                    schema, handle, writer = writers.get(key, (None, None, None))
                    if schema is not None and schema != rows.schema:
                        writer.close()
                        handle.close()
                        schema = None
                    if schema is None:
                        files = staged.files.setdefault(key, [])
                        month, bucket = parse_partition_key(key)
                        path = f"{self.root}/{name}/{month}.{bucket}.{len(files)}.arrow"
                        files.append(path)
                        handle = self.filesystem.open_output_stream(path)
                        writer = pa.ipc.new_file(handle, rows.schema, options=IPC_OPTIONS)
                        writers[key] = (rows.schema, handle, writer)
                    writer.write_table(rows)
                    staged.rows[key] = staged.rows.get(key, 0) + rows.num_rows
        finally:
            for _, handle, writer in writers.values():
                writer.close()
                handle.close()
        return staged

    def read(self, name: str, key: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One partition of a table (or some of its columns), as delivered."""
        tables = []
        for path in self.tables[name].files.get(key, []):
            with self.filesystem.open_input_file(path) as handle:
                table = pa.ipc.open_file(handle).read_all()
            tables.append(table.select([c for c in columns if c in table.column_names]) if columns else table)
        return concat(tables)

    def dataset(self, name: str, columns: Sequence[str], buckets: Sequence[int] | None = None) -> pads.Dataset:
        """Some columns (schema-typed in every file: see `StagedTable.typed_columns`) of a table's files,
        with the partition columns `month` and `bucket`; only those buckets' files when given."""
        spec = TABLES[name]
        files = [(path, parse_partition_key(key)) for key, paths in self.tables[name].files.items() for path in paths
                 if buckets is None or parse_partition_key(key)[1] in buckets]
        schema = pa.schema([*(pa.field(c, spec.column_index[c].type) for c in columns),
                            pa.field(MONTH, pa.string()), pa.field(BUCKET, pa.int16())])
        return pads.FileSystemDataset.from_paths(
            [path for path, _ in files], schema=schema, format=pads.IpcFileFormat(), filesystem=self.filesystem,
            partitions=[(pc.field(MONTH) == month) & (pc.field(BUCKET) == pa.scalar(bucket, pa.int16()))
                        for _, (month, bucket) in files],
        )

    def distinct(self, name: str, column: str, buckets: Sequence[int] | None = None) -> pa.Array:
        """The distinct values of a schema-typed column of the batch's table (those buckets only)."""
        table = self.dataset(name, [column], buckets).to_table(columns=[column])
        return pc.unique(table.column(column).combine_chunks())

    def remove(self) -> None:
        """Remove the batch's files, and the staging folder when no other batch's are in it."""
        fs = self.store.fs
        if fs.exists(self.root):
            self.filesystem.delete_dir(self.root)
        for folder in (self.store._file(STAGING), self.store._file()):  # nor the store's, if it made it
            if fs.exists(folder) and not fs.ls(folder):
                fs.rmdir(folder)


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    """Tables of one partition as one: their types may differ when a column failed to cast in some record
    batches (it is rejected by validation, which must still see every row): such a column becomes text."""
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        types: dict[str, set[pa.DataType]] = {}
        for table in tables:
            for f in table.schema:
                types.setdefault(f.name, set()).add(f.type)
        mixed = {n for n, ts in types.items() if len(ts) > 1}
        return pa.concat_tables(
            [table.cast(pa.schema([pa.field(f.name, pa.string()) if f.name in mixed else f for f in table.schema]))
             for table in tables],
            promote_options="permissive",
        )
