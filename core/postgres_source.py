"""The platform's PostgreSQL database as an ingest source: each pull reads the rows that are new or changed
since the last pull that committed, in chunks, as Arrow.

Watermark semantics. Every table has a change time (`core.postgres.change_expression`: `updated_at`, or the
table's time column while a row never changed or where rows never change). A pull
- reads every table in ONE `REPEATABLE READ, READ ONLY` transaction: one snapshot of the database, so the
  tables agree with each other (no loan without its application) and the rows read are exactly the rows
  the fingerprint and the new watermarks were computed from;
- reads a table's rows whose change time is `>=` its watermark minus an overlap (`[ingest]
  .watermark_overlap_seconds`), all of it on the first pull;
- proposes as the new watermark the largest change time in that snapshot (`state`); ingest commits it in
  the raw store's manifest with the batch, so it moves only when the pull commits.

Why the overlap: a pull cannot see a transaction that commits after its snapshot was taken, yet such a
transaction's rows may carry change times earlier than the largest one the pull saw (a long transaction;
an application server's clock a little behind). `>` the last watermark would skip them for ever. Reading
again from the watermark minus the overlap catches every row whose transaction lasted less than the
overlap (plus clock skew); the rows read again are upserted by key into the raw store, which leaves a
partition whose rows did not change byte for byte as it was, so reading them twice costs time, never
correctness. A row committed with a change time older than that window is missed: the overlap must
exceed the platform's longest writing transaction. Deleted rows are never seen (the platform keeps rows
and changes their status). The watermarks belong to one database: a pull from another (another server,
database or schema) starts from scratch, which is always correct since loading is an upsert.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import adbc_driver_manager
import pyarrow as pa

from core.postgres import PostgresError, change_expression, connect, pg_type, quote, reason, redact
from core.schemas import TABLES, TableSpec, conform
from core.settings import IngestConfig, Settings

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = timedelta(seconds=IngestConfig().watermark_overlap_seconds)
BATCH_BYTES = 16 << 20
"""Size of the Arrow batches the driver hands over (its hint): the memory a chunk of a table takes."""
STATE_KEY = "postgresql"
"""The raw store's source state this source reads and writes: {database, overlap_seconds, watermarks}."""

_FLOAT_FROM = {"numeric", "real", "integer", "bigint", "smallint"}
"""Column types a float column of the data model is read from with a cast in SQL (money is often numeric,
which binary COPY would hand over as text)."""


def from_url(text: str, settings: Settings | None = None, state: Mapping[str, Any] | None = None) -> PostgresSource:
    """The pull from the database at `text` that follows the one whose source state (`state`) the raw store
    holds; `core.sources.open_source` calls it for a postgresql:// source."""
    ingest = settings.ingest if settings is not None else IngestConfig()
    return PostgresSource(text, state, timedelta(seconds=ingest.watermark_overlap_seconds))


class PostgresSource:
    """One pull from the platform's database; close it (or use it as a context manager) when done."""

    def __init__(
        self,
        url: str,
        previous: Mapping[str, Any] | None = None,
        overlap: timedelta = DEFAULT_OVERLAP,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        """`previous`: the raw store's source state, committed with the last pull (None: pull everything)."""
        self.url = url
        self.description = redact(url)
        self.overlap = overlap
        self.batch_bytes = batch_bytes
        self._connection = connect(url)
        try:
            self._cursor = self._connection.cursor()
            self._execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self.database = self._identity()
            self._types = self._check_tables()
            self.since = self._since(previous or {})
            self._stats: dict[str, tuple[int, datetime | None, str]] | None = None
        except BaseException:
            self.close()
            raise

    def __del__(self) -> None:  # a dropped source must not hold its snapshot open (it holds back vacuum)
        self.close()

    def __enter__(self) -> PostgresSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the read-only transaction and the connection (quietly when the server has gone already)."""
        cursor, connection = getattr(self, "_cursor", None), getattr(self, "_connection", None)
        self._cursor = self._connection = None
        with contextlib.suppress(adbc_driver_manager.Error):
            if cursor is not None:
                cursor.close()
            if connection is not None:
                connection.rollback()
        if connection is not None:
            with contextlib.suppress(adbc_driver_manager.Error):
                connection.close()

    def tables(self) -> list[str]:
        return list(TABLES)

    def fingerprint(self) -> str:
        """Hash of the rows this pull reads: each table's count, latest change time and content hash, computed
        by the server in the pull's snapshot."""
        digest = hashlib.sha256()
        for name, (rows, latest, content) in self.stats().items():
            digest.update(f"{name}:{self.since[name]}:{rows}:{latest}:{content};".encode())
        return digest.hexdigest()[:16]

    def rows(self, name: str) -> int:
        """The number of rows `batches(name)` yields."""
        return self.stats()[name][0]

    def batches(self, name: str) -> Iterator[pa.RecordBatch]:
        """The table's rows past its watermark, conformed to the data model, a chunk at a time."""
        spec = TABLES[name]
        self.stats()  # the snapshot's figures first: the batches are the rows they describe
        columns = ", ".join(f"{self._value(spec, c.name)} AS {quote(c.name)}" for c in spec.columns)
        self._execute(f"SELECT {columns} FROM {quote(name)}{self._where(spec)}", stream=True)
        try:
            reader = self._cursor.fetch_record_batch()
            for batch in reader:
                yield from conform(pa.Table.from_batches([batch]), spec).to_batches()
        except adbc_driver_manager.Error as exc:
            raise PostgresError(f"cannot read table '{name}' from PostgreSQL {self.description}: "
                                f"{reason(exc, self.url)}") from None

    def state(self) -> dict[str, Any]:
        """The watermarks this pull moves to once committed: per table the latest change time it read (the
        previous watermark when it read nothing new)."""
        watermarks = {}
        for name, (_, latest, _) in self.stats().items():
            previous = self.since[name] + self.overlap if self.since[name] is not None else None
            mark = latest if latest is not None else previous
            if mark is not None:
                watermarks[name] = mark.isoformat()
        return {STATE_KEY: {"database": self.database, "overlap_seconds": self.overlap.total_seconds(),
                            "watermarks": watermarks}}

    def stats(self) -> dict[str, tuple[int, datetime | None, str]]:
        """Per table, in the pull's snapshot: the rows past the watermark, their latest change time, and a
        hash of their content (a sum of row hashes: order does not matter, any changed value does)."""
        if self._stats is None:
            self._stats = {}
            for name, spec in TABLES.items():
                row = ", ".join(self._value(spec, c.name) for c in spec.columns)
                self._execute(
                    f"SELECT count(*), max({change_expression(spec)}), "
                    f"coalesce(sum(hashtextextended(ROW({row})::text, 0)), 0)::text "
                    f"FROM {quote(name)}{self._where(spec)}"
                )
                self._stats[name] = self._cursor.fetchone()
        return self._stats

    def _where(self, spec: TableSpec) -> str:
        since = self.since[spec.name]
        return "" if since is None else f" WHERE {change_expression(spec)} >= TIMESTAMP '{since.isoformat(' ')}'"

    def _value(self, spec: TableSpec, column: str) -> str:
        """A column as read: numbers stored in a wider numeric type are cast to the data model's float."""
        actual = self._types[spec.name].get(column)
        if actual is None:  # an optional column the table does not have yet: empty
            return f"NULL::{pg_type(spec.column_index[column].type)}"
        if pa.types.is_floating(spec.column_index[column].type) and actual in _FLOAT_FROM:
            return f"{quote(column)}::double precision"
        return quote(column)

    def _since(self, state: Mapping[str, Any]) -> dict[str, datetime | None]:
        """Where each table's read starts: its watermark minus the overlap; nowhere (all of it) without one."""
        previous = state.get(STATE_KEY) or {}
        if previous.get("database") != self.database:
            if previous:
                log.info("the last pull was from another database (%s): pulling everything from %s",
                         previous.get("database"), self.description)
            previous = {}
        marks = previous.get("watermarks", {})
        return {name: datetime.fromisoformat(marks[name]) - self.overlap if name in marks else None
                for name in TABLES}

    def _identity(self) -> str:
        """The database the watermarks belong to: the cluster's system identifier, database and schema."""
        self._execute("SELECT (SELECT system_identifier FROM pg_control_system())::text, current_database(), "
                      "current_schema()")
        return "/".join(str(part) for part in self._cursor.fetchone())

    def _check_tables(self) -> dict[str, dict[str, str]]:
        """Each table's column types; a table or column of the data model that is missing is one error."""
        names = ", ".join(f"'{name}'" for name in TABLES)
        self._execute(
            "SELECT t.name, a.attname, format_type(a.atttypid, NULL) FROM unnest(ARRAY[" + names + "]) AS t(name) "
            "LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(quote_ident(t.name)) "
            "AND a.attnum > 0 AND NOT a.attisdropped"
        )
        types: dict[str, dict[str, str]] = {name: {} for name in TABLES}
        for name, column, type_ in self._cursor.fetchall():
            if column is not None:
                types[name][column] = type_
        absent = [name for name, columns in types.items() if not columns]
        if absent:
            raise PostgresError(
                f"PostgreSQL {self.description} has no table {', '.join(absent)} (looked up on the search path; "
                f"current schema: {self.database.rsplit('/', 1)[-1]}); a pull reads the data model's tables: "
                f"{', '.join(TABLES)}")
        missing = [
            f"{name}.{c.name}" for name, spec in TABLES.items() for c in spec.columns
            if c.name not in types[name] and (not c.optional or c.name == spec.change_column)
        ]
        if missing:
            raise PostgresError(f"PostgreSQL {self.description} lacks column(s) {', '.join(missing)} of the data "
                                "model (see docs/data.md)")
        return types

    def _execute(self, sql: str, stream: bool = False) -> None:
        try:
            if stream:
                self._cursor.adbc_statement.set_options(
                    **{"adbc.postgresql.batch_size_hint_bytes": str(self.batch_bytes)})
            self._cursor.execute(sql)
        except adbc_driver_manager.Error as exc:
            raise PostgresError(f"PostgreSQL {self.description}: {reason(exc, self.url)}") from None
