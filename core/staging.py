"""A batch cut into the raw store's partitions before it is validated, by as many tasks as the source has
pieces, in bounded memory, so that each partition can then be validated and written by any worker alone.

Each piece of a table (`core.sources.Piece`: a file or some row groups; a source without pieces is one
stream read by the flow's process) is split by one call of `BatchSpill.split`: its record batches are cut
by partition (`core.partitioning`) and appended, one record batch per partition and input batch, to one
Arrow IPC file of its own, `_staging/<token>/<table>/<part>.<n>.arrow` beside the raw store (where every
worker reads it); the file's footer indexes its record batches, and the split returns which ones belong to
which partition (`SplitPart`: small, whatever the data). A partition's rows are then those record batches
of every file of its table (`BatchSpill.read`). So no process holds more than a record batch of the source,
and the flow's process only the index. A second file per piece, `<part>.keys.arrow`, holds the table's
key with each row's `month` and `bucket`: the checks across partitions (DuckDB) and the foreign-key domains
read those alone.

IPC files are uncompressed on a local disk (read back through a memory map: no decoding, measured a
fifth of lz4's CPU) and lz4-compressed elsewhere (object storage: bytes cost more than CPU). A batch's
columns are kept as delivered (after `conform`), so a badly typed column still reaches validation; a record
batch of other types starts another file. The folder is removed when the ingest ends, passed or not; one
left by a killed ingest is removed by the next, with the partition files its tasks had written into the
raw store's tables but never committed (`RawStore.remove_unreferenced`, from the ledger `_written/`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pa_fs

from core.partitioning import BUCKET, MONTH, parse_partition_key, split_by_partition
from core.raw_store import STAGING, RawStore
from core.schemas import CHANGED_AT, TABLES, TIMESTAMP
from core.storage import arrow_filesystem

LEDGER = "_written"
"""Below a batch's folder: a note per partition file its tasks wrote into the raw store (see module doc)."""

KEY_BATCH_ROWS = 65_536
"""Rows of a record batch of the keys handed to DuckDB (`BatchSpill.key_reader`)."""

Located = tuple[str, tuple[int, ...]]
"""A spill file and the indices of the record batches in it that belong to one partition."""


@dataclass(frozen=True)
class SplitPart:
    """What splitting one piece of a table wrote: where each partition's rows are, and how many."""

    table: str
    files: dict[str, list[Located]]
    rows: dict[str, int]
    typed_columns: set[str] | None
    """Columns that have their schema type in every record batch (None: no record batch)."""
    key_file: str | None
    """The key, month and bucket of every row (None when the key column is missing or mistyped somewhere)."""


@dataclass
class StagedTable:
    """Where one table of the batch went, all its pieces together."""

    files: dict[str, list[Located]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    typed_columns: set[str] | None = None
    key_files: list[str] | None = field(default_factory=list)
    """None once a piece could not write its key file."""

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def take(self, part: SplitPart) -> None:
        for key, located in part.files.items():
            self.files.setdefault(key, []).extend(located)
        for key, rows in part.rows.items():
            self.rows[key] = self.rows.get(key, 0) + rows
        if part.typed_columns is not None:
            typed = self.typed_columns
            self.typed_columns = part.typed_columns if typed is None else typed & part.typed_columns
        if part.typed_columns is not None:  # a piece without rows writes no key file and needs none
            self.key_files = None if part.key_file is None or self.key_files is None else [
                *self.key_files, part.key_file]


class BatchSpill:
    """The batch's rows by table and partition, in files beside the raw store. Pickled to tasks: keep
    `tables` to what they need (`for_tasks`)."""

    def __init__(self, store: RawStore, token: str | None = None) -> None:
        self.store = store
        self.token = token or uuid.uuid4().hex
        self.root = store._file(STAGING, self.token)
        self.tables: dict[str, StagedTable] = {}

    @property
    def local(self) -> bool:
        return isinstance(self.store.root, Path)

    @property
    def filesystem(self) -> pa_fs.FileSystem:
        return arrow_filesystem(self.store.fs)

    @property
    def ledger(self) -> str:
        return f"{self.root}/{LEDGER}"

    @staticmethod
    def clear_leftovers(store: RawStore) -> None:
        """Remove what a killed ingest left: its spill, and the partition files it wrote but never committed
        (one writer at a time: nothing else is staging; call it after `RawStore.recover`)."""
        staging = store._file(STAGING)
        if not store.fs.exists(staging):
            return
        for folder in store.fs.ls(staging, detail=False):
            store.remove_unreferenced(f"{folder.rstrip('/')}/{LEDGER}")
        store.fs.rm(staging, recursive=True)

    def for_tasks(self, names: Iterable[str]) -> BatchSpill:
        """This spill with only those tables' key files and types (no partition index): what a task pickles."""
        slim = BatchSpill(self.store, self.token)
        slim.tables = {n: StagedTable(typed_columns=self.tables[n].typed_columns, key_files=self.tables[n].key_files)
                       for n in names if n in self.tables}
        return slim

    def split(self, name: str, part: str, batches: Iterable[pa.RecordBatch], buckets: int) -> SplitPart:
        """Cut one piece of a table into partitions, in files of its own (`part` names them); memory is one
        record batch of the source."""
        spec = TABLES[name]
        files: dict[str, list[Located]] = {}
        rows: dict[str, int] = {}
        typed_columns: set[str] | None = None
        key_ok = True
        filesystem = self.filesystem
        options = pa.ipc.IpcWriteOptions(compression=None if self.local else "lz4")
        key_schema = _key_schema(spec.arrow_schema.field(spec.key))
        filesystem.create_dir(f"{self.root}/{name}", recursive=True)
        key_path = f"{self.root}/{name}/{part}.keys.arrow"
        open_: list[Any] = []  # (schema, handle, writer, path, batches written) of the current data file
        written = 0
        key_sink = filesystem.open_output_stream(key_path)
        key_writer = pa.ipc.new_file(key_sink, key_schema, options=options)
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                typed = {c.name for c in spec.columns if c.name in batch.schema.names
                         and batch.schema.field(c.name).type == c.type}
                typed_columns = typed if typed_columns is None else typed_columns & typed
                key_ok = key_ok and spec.key in typed
                if not open_ or open_[0] != batch.schema:
                    _close(open_)
                    path = f"{self.root}/{name}/{part}.{written}.arrow"
                    handle = filesystem.open_output_stream(path)
                    open_[:] = [batch.schema, handle, pa.ipc.new_file(handle, batch.schema, options=options), path, 0]
                    written += 1
                for key, chunk in split_by_partition(pa.Table.from_batches([batch]), spec.time_column, buckets).items():
                    month, bucket = parse_partition_key(key)
                    indices = []
                    for record_batch in chunk.to_batches():
                        open_[2].write_batch(record_batch)
                        indices.append(open_[4])
                        open_[4] += 1
                        if key_ok:
                            n = record_batch.num_rows
                            key_writer.write_batch(pa.record_batch([
                                record_batch.column(spec.key), pa.repeat(month, n),
                                pa.repeat(pa.scalar(bucket, pa.int16()), n), spec.changed_at(record_batch)],
                                schema=key_schema))
                    files.setdefault(key, []).append((open_[3], tuple(indices)))
                    rows[key] = rows.get(key, 0) + chunk.num_rows
        finally:
            _close(open_)
            key_writer.close()
            key_sink.close()
        return SplitPart(name, _merged(files), rows, typed_columns, key_path if key_ok else None)

    def take(self, part: SplitPart) -> None:
        """Add a piece's split (done anywhere) to the batch's index."""
        self.tables.setdefault(part.table, StagedTable()).take(part)

    def read(self, name: str, located: Mapping[str, Sequence[Located]]) -> dict[str, pa.Table]:
        """Some partitions of a table, as delivered, from where their rows are (`StagedTable.files`): each
        file opened once."""
        by_file: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        for key, places in located.items():
            for path, indices in places:
                by_file.setdefault(path, []).append((key, indices))
        chunks: dict[str, list[pa.RecordBatch]] = {key: [] for key in located}
        filesystem = self.filesystem
        for path, wanted in by_file.items():
            source = pa.memory_map(path) if self.local else filesystem.open_input_file(path)
            with source:
                reader = pa.ipc.open_file(source)
                for key, indices in wanted:
                    chunks[key] += [reader.get_batch(i) for i in indices]
        return {key: concat(_tables(batches)) for key, batches in chunks.items()}

    def key_dataset(self, name: str) -> pads.Dataset:
        """The table's key, `month`, `bucket` and `changed_at` of every row (the key typed in every record
        batch)."""
        spec = TABLES[name]
        return pads.FileSystemDataset.from_paths(
            self.tables[name].key_files or [], schema=_key_schema(spec.arrow_schema.field(spec.key)),
            format=pads.IpcFileFormat(), filesystem=self.filesystem)

    def key_reader(self, name: str) -> pa.RecordBatchReader:
        """What `key_dataset` holds, for DuckDB: read in the thread that pulls it, file after file, the small
        record batches of the split joined into about `KEY_BATCH_ROWS` rows. Not an Arrow dataset: when
        DuckDB stops scanning one midway (a query running out of memory), Arrow's asynchronous reads of its
        files go on over freed state and the process dies (a segfault in 2 of 15 ingests at a 2MB budget)."""
        spec = TABLES[name]
        paths = self.tables[name].key_files or []

        def batches() -> Iterator[pa.RecordBatch]:
            pending: list[pa.RecordBatch] = []
            rows = 0
            for path in paths:
                with pa.memory_map(path) if self.local else self.filesystem.open_input_file(path) as source:
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        pending.append(reader.get_batch(i))
                        rows += pending[-1].num_rows
                        if rows >= KEY_BATCH_ROWS:
                            yield pa.concat_batches(pending)
                            pending, rows = [], 0
            if pending:
                yield pa.concat_batches(pending)

        return pa.RecordBatchReader.from_batches(_key_schema(spec.arrow_schema.field(spec.key)), batches())

    def has_keys(self, name: str, column: str) -> bool:
        """Whether the batch delivers the table with `column` as its key, typed and indexed (`key_dataset`)."""
        staged = self.tables.get(name)
        return (staged is not None and column == TABLES[name].key and bool(staged.key_files)
                and column in (staged.typed_columns or set()))

    def distinct(self, name: str, column: str, buckets: Sequence[int] | None = None) -> pa.Array:
        """The distinct keys (`has_keys`) of the batch's table, of those buckets only when given."""
        import pyarrow.compute as pc

        dataset = self.key_dataset(name)
        wanted = None if buckets is None else pc.field(BUCKET).isin(pa.array(list(buckets), pa.int16()))
        values = dataset.to_table(columns=[column], filter=wanted).column(column)
        return pc.unique(values.combine_chunks()) if len(values) else pa.array([], values.type)

    def remove(self) -> None:
        """Remove the batch's files, with the partition files its tasks wrote that no commit took; and the
        staging folder when no other batch's are in it."""
        fs = self.store.fs
        self.store.remove_unreferenced(self.ledger)
        if fs.exists(self.root):
            self.filesystem.delete_dir(self.root)
        for folder in (self.store._file(STAGING), self.store._file()):  # nor the store's, if it made it
            if fs.exists(folder) and not fs.ls(folder):
                fs.rmdir(folder)


def _key_schema(key: pa.Field) -> pa.Schema:
    return pa.schema([key, pa.field(MONTH, pa.string()), pa.field(BUCKET, pa.int16()), pa.field(CHANGED_AT, TIMESTAMP)])


def _close(open_: list[Any]) -> None:
    if open_:
        open_[2].close()
        open_[1].close()
        open_.clear()


def _merged(files: dict[str, list[Located]]) -> dict[str, list[Located]]:
    """One entry per file and partition (a partition gets a record batch from each input batch)."""
    out: dict[str, list[Located]] = {}
    for key, places in files.items():
        by_path: dict[str, list[int]] = {}
        for path, indices in places:
            by_path.setdefault(path, []).extend(indices)
        out[key] = [(path, tuple(indices)) for path, indices in by_path.items()]
    return out


def _tables(batches: Sequence[pa.RecordBatch]) -> list[pa.Table]:
    """Record batches as tables, those of one schema together."""
    groups: dict[pa.Schema, list[pa.RecordBatch]] = {}
    for batch in batches:
        groups.setdefault(batch.schema, []).append(batch)
    return [pa.Table.from_batches(group) for group in groups.values()]


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
