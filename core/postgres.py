"""The platform's PostgreSQL database: connections whose failures read as one line, and the data model's
tables created and loaded there.

Everything goes through ADBC's PostgreSQL driver (libpq underneath), so Arrow batches go in and out by
binary COPY with no row-by-row Python. Credentials follow libpq: a password in the URL works, but the
place for it is `PGPASSWORD` or `~/.pgpass` (and `PGHOST`, `PGUSER`... fill in what the URL leaves out).
Messages name the database by its URL with the password removed.

Loading is an upsert by each table's key (a staging table, then `INSERT ... ON CONFLICT DO UPDATE`), in one
transaction: a daily increment (new rows and state changes of older rows) lands whole or not at all, and
loading the same rows twice changes nothing. The tables carry a primary key on the data model's key and
an index on the change time the incremental pull filters on (`change_expression`); no foreign keys or
checks, since refusing bad rows is the ingest's validation, which names table, column and rule.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

import adbc_driver_manager
import pyarrow as pa

from core.errors import ScfriskError
from core.schemas import TABLES, TIMESTAMP, TableSpec, conform
from core.sources import FolderSource

if TYPE_CHECKING:
    from adbc_driver_manager.dbapi import Connection

log = logging.getLogger(__name__)

SCHEMES = ("postgresql://", "postgres://")

_TYPES = {
    pa.string(): "text",
    pa.int64(): "bigint",
    pa.int32(): "integer",
    pa.int8(): "smallint",  # PostgreSQL has no one-byte integer
    pa.float64(): "double precision",
    TIMESTAMP: "timestamp",
}
"""The column type of each Arrow type of the data model; binary COPY returns them as those Arrow types
again (smallint as int16, which `conform` narrows)."""


class PostgresError(ScfriskError):
    """A database that cannot be reached, read or written as the platform's; the message has no password."""


def is_postgres_url(text: str) -> bool:
    return text.startswith(SCHEMES)


def redact(url: str) -> str:
    """The URL without its password (and without its query, which may carry one too)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username
    return urlunsplit((parts.scheme, f"{user}@{host}" if user else host, parts.path, "", ""))


def password_to_environment(url: str) -> str:
    """The URL without its password, which goes to `PGPASSWORD` for libpq instead: a URL passed on to a flow
    run is recorded as its parameter, and must not carry the password there."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    os.environ["PGPASSWORD"] = unquote(parts.password)
    netloc = f"{parts.netloc.rpartition('@')[0].partition(':')[0]}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str) -> Connection:
    """An ADBC connection (autocommit off), or a `PostgresError` with libpq's reason on one line."""
    import adbc_driver_postgresql.dbapi

    try:
        return adbc_driver_postgresql.dbapi.connect(url)
    except adbc_driver_manager.Error as exc:
        raise PostgresError(f"cannot connect to PostgreSQL {redact(url)}: {reason(exc, url)}") from None


def reason(exc: Exception, url: str) -> str:
    """The driver's message as one line a user can act on: libpq's own words, no driver prefix, no password
    (libpq quotes a malformed URL back whole)."""
    text = re.sub(r"^[A-Z_]+: (\[libpq\] )?(Failed to \w+ ?\w*( '.*?')?: )?", "", str(exc), flags=re.DOTALL)
    text = re.split(r"\s+(LINE \d+:|Query was:)", text)[0]  # the SQL quoted back is ours, not the user's
    text = re.sub(r"\s+", " ", re.sub(r"\.? SQLSTATE: \w+", "", text)).strip()
    password = urlsplit(url).password
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def pg_type(type_: pa.DataType) -> str:
    return _TYPES[type_]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def change_expression(spec: TableSpec) -> str:
    """SQL of a row's change time: `updated_at`, empty until the row first changes, falls back to the time
    column. The pull filters on exactly this expression, so the index built on it serves the filter."""
    if spec.change_column == spec.time_column:
        return quote(spec.time_column)
    return f"COALESCE({quote(spec.change_column)}, {quote(spec.time_column)})"


def create_sql(spec: TableSpec) -> list[str]:
    """The table of the data model (if absent) with its primary key, and the index of its change time."""
    columns = ", ".join(
        f"{quote(c.name)} {pg_type(c.type)}{'' if c.nullable else ' NOT NULL'}" for c in spec.columns
    )
    return [
        f"CREATE TABLE IF NOT EXISTS {quote(spec.name)} ({columns}, PRIMARY KEY ({quote(spec.key)}))",
        f"CREATE INDEX IF NOT EXISTS {quote(spec.name + '_changed')} ON {quote(spec.name)} "
        f"(({change_expression(spec)}))",
    ]


def upsert_sql(spec: TableSpec, staging: str) -> str:
    """Insert the staged rows, replacing the stored row of the same key (a state change of an older row)."""
    names = [quote(c.name) for c in spec.columns]
    updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n != quote(spec.key))
    return (
        f"INSERT INTO {quote(spec.name)} ({', '.join(names)}) SELECT {', '.join(names)} FROM pg_temp.{quote(staging)} "
        f"ON CONFLICT ({quote(spec.key)}) DO UPDATE SET {updates}"
    )


def load(url: str, tables: Mapping[str, Iterable[pa.RecordBatch]]) -> dict[str, int]:
    """Upsert each table's batches (any subset of the data model, in its order) in one transaction; the rows
    delivered per table. Every table of the data model is created if absent. Batches stream through: one is
    in memory at a time."""
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise PostgresError(f"unknown table(s) {', '.join(unknown)}; known tables: {', '.join(TABLES)}")
    rows: dict[str, int] = {}
    connection = connect(url)
    try:
        with connection.cursor() as cursor:
            for statement in [s for spec in TABLES.values() for s in create_sql(spec)]:
                cursor.execute(statement)
            for name in [n for n in TABLES if n in tables]:
                spec = TABLES[name]
                staging = f"{name}__staging"
                counted = _counted(spec, tables[name], rows)
                cursor.adbc_ingest(staging, pa.RecordBatchReader.from_batches(spec.arrow_schema, counted),
                                   mode="replace", temporary=True)
                cursor.execute(upsert_sql(spec, staging))
                cursor.execute(f"DROP TABLE pg_temp.{quote(staging)}")
                log.info("%s: %s rows upserted into %s", name, f"{rows[name]:,}", redact(url))
        connection.commit()
    except adbc_driver_manager.Error as exc:
        raise PostgresError(f"cannot load into PostgreSQL {redact(url)}: {reason(exc, url)}") from None
    finally:
        connection.close()
    return rows


def load_folder(url: str, folder: Path) -> dict[str, int]:
    """Upsert a batch folder (Parquet or CSV tables, `core.batch`) in one transaction."""
    source = FolderSource(folder)
    return load(url, {name: source.batches(name) for name in source.tables()})


def check(url: str) -> None:
    """Connect and disconnect: a wrong URL, host or password is refused before any work starts."""
    if not is_postgres_url(url):
        raise PostgresError(f"{redact(url)} is not a database URL: use {' or '.join(s + '...' for s in SCHEMES)}")
    connect(url).close()


def _counted(spec: TableSpec, batches: Iterable[pa.RecordBatch], rows: dict[str, int]) -> Iterator[pa.RecordBatch]:
    """The batches in the table's exact schema (the staging table takes its column types from it)."""
    rows[spec.name] = 0
    for batch in batches:
        table = conform(pa.Table.from_batches([batch]), spec).select([c.name for c in spec.columns])
        rows[spec.name] += table.num_rows
        yield from table.cast(spec.arrow_schema).to_batches()
