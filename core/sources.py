"""Where a batch comes from: the protocol ingest reads, a batch folder, and the choice by the text given.

Ingest never reads files or databases itself: it asks a `Source` for the tables present, a fingerprint
(the same data gives the same one, so a loaded batch is not ingested twice), each table as a stream of
record batches (bounded memory whatever the table's size), and the state to commit with the batch (a
database's watermarks: they move only when the pull commits, in the raw store's manifest).

A source whose tables are files also cuts each table into `Piece`s (`pieces`): a file, or a range of a
Parquet file's row groups, that any process reaching the files reads alone, so the ingest splits a batch
with one task per piece on the engine instead of in one pass in the flow's process. A database pull is one
snapshot in one transaction, so it has no pieces: the flow's process streams it.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.batch import BatchError, locate_tables
from core.files import file_sha256
from core.schemas import TABLES, conform

if TYPE_CHECKING:
    from core.settings import Settings

BATCH_ROWS = 1 << 20
"""Rows per record batch read from a file: ~100 MB of the widest table (orders), fewer and larger writes."""
PIECE_ROWS = 2 << 20
"""Rows of a Parquet file that one piece reads at most (whole row groups; a larger row group is a piece)."""


@runtime_checkable
class Source(Protocol):
    """A batch of platform tables to ingest."""

    description: str
    """For messages: a folder, or a database URL without its password."""

    def tables(self) -> list[str]:
        """The tables present, in `core.schemas.TABLES` order."""
        ...

    def fingerprint(self) -> str:
        """Same data, same fingerprint."""
        ...

    def batches(self, name: str) -> Iterator[pa.RecordBatch]:
        """The table's rows, each batch conformed to `TABLES[name]` (`core.schemas.conform`: cast where
        lossless, a column that will not cast left as delivered for validation to report)."""
        ...

    def state(self) -> dict[str, Any]:
        """What to commit as the raw store's `source_state` when this pull commits ({} when nothing)."""
        ...


SOURCE_MODULES = {"postgresql": "core.postgres_source", "postgres": "core.postgres_source"}
"""URL schemes read by a module of their own, which defines `from_url(text, settings, state) -> Source` (`state`:
the raw store's source state, committed with the last pull)."""


def open_source(text: str, settings: Settings | None = None, state: Mapping[str, Any] | None = None) -> Source:
    """The source a `--source` names: a database URL by its scheme, else a batch folder (path or file://)."""
    scheme = urlsplit(text).scheme if "://" in text else ""
    if scheme in SOURCE_MODULES:
        try:
            module = importlib.import_module(SOURCE_MODULES[scheme])
        except ModuleNotFoundError as exc:
            raise BatchError(f"no {scheme} source in this installation ({exc.name} is missing)") from exc
        return module.from_url(text, settings, state)
    if scheme not in ("", "file"):
        raise BatchError(
            f"unknown source '{scheme}://...': give a batch folder or one of "
            + ", ".join(f"{s}://" for s in SOURCE_MODULES)
        )
    return FolderSource(Path(unquote(text.removeprefix("file://"))))


class FolderSource:
    """A batch folder: `<table>.parquet`, `<table>/` (Parquet parts) or `<table>.csv` per table (`core.batch`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.description = str(folder)
        self.paths = locate_tables(folder)

    def tables(self) -> list[str]:
        return list(self.paths)

    def fingerprint(self) -> str:
        """Content hash of the table files, named relative to the batch: the same files in another folder
        give the same fingerprint, a changed file another one."""
        digest = hashlib.sha256()
        for name, path in self.paths.items():
            for file in self._files(path):
                digest.update(f"{name}/{file.relative_to(path.parent)}:{file_sha256(file)};".encode())
        return digest.hexdigest()[:16]

    def batches(self, name: str) -> Iterator[pa.RecordBatch]:
        for piece in self.pieces(name):
            yield from piece.batches()

    def pieces(self, name: str) -> list[Piece]:
        """The table's files, a Parquet file cut into ranges of whole row groups of about `PIECE_ROWS` rows
        (its footer only is read here)."""
        out = []
        for file in self._files(self.paths[name]):
            if file.suffix == ".csv":
                out.append(Piece(name, str(file)))
                continue
            try:
                metadata = pq.read_metadata(file)
            except (pa.ArrowInvalid, OSError) as exc:
                raise BatchError(f"cannot read table '{name}' from {file}: {exc}") from exc
            groups: list[int] = []
            rows = 0
            for i in range(metadata.num_row_groups):
                if groups and rows + metadata.row_group(i).num_rows > PIECE_ROWS:
                    out.append(Piece(name, str(file), tuple(groups)))
                    groups, rows = [], 0
                groups.append(i)
                rows += metadata.row_group(i).num_rows
            whole = len(groups) == metadata.num_row_groups  # the file in one piece (or an empty file)
            out.append(Piece(name, str(file), None if whole else tuple(groups)))
        return out

    def state(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def _files(path: Path) -> list[Path]:
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) \
            if path.is_dir() else [path]


@dataclass(frozen=True)
class Piece:
    """A part of one table's files that a task reads alone: a whole file, or some row groups of a Parquet
    file. Plain data, pickled to the engine's workers (which must reach the same path)."""

    table: str
    path: str
    row_groups: tuple[int, ...] | None = None
    """None: the whole file."""

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The piece's rows, conformed as `Source.batches` says."""
        spec, file = TABLES[self.table], Path(self.path)
        try:
            if file.suffix == ".csv":
                options = pacsv.ConvertOptions(
                    column_types={c.name: pa.string() for c in spec.columns}, strings_can_be_null=True
                )
                read = pacsv.ReadOptions(block_size=64 << 20)
                with pacsv.open_csv(file, read_options=read, convert_options=options) as reader:
                    for batch in reader:
                        yield _conformed(batch, self.table, from_text=True)
            else:
                for batch in pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS, row_groups=self.row_groups):
                    yield _conformed(batch, self.table)
        except (pa.ArrowInvalid, OSError) as exc:
            raise BatchError(f"cannot read table '{self.table}' from {file}: {exc}") from exc


def pieces(source: Source, name: str) -> list[Piece] | None:
    """The table in pieces that tasks read alone, or None when the source streams it only from here."""
    cut = getattr(source, "pieces", None)
    return cut(name) if callable(cut) else None


def _conformed(batch: pa.RecordBatch, name: str, from_text: bool = False) -> pa.RecordBatch:
    table = conform(pa.Table.from_batches([batch]), TABLES[name], from_text=from_text)
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)


def read_table(source: Source, name: str) -> pa.Table:
    """A whole table of a source in memory (small tables and tests; ingest streams instead)."""
    batches = list(source.batches(name))
    if not batches:
        return TABLES[name].arrow_schema.empty_table()
    return pa.Table.from_batches(batches) if len({b.schema for b in batches}) == 1 else pa.concat_tables(
        [pa.Table.from_batches([b]) for b in batches], promote_options="permissive")
