"""Which point-in-time feature values a change of the raw store can have reached: what a cache of features
(or of a score computed from them) must recompute when the raw store moves to a new snapshot.

A feature of merchant m as of t reads m's rows only (every fact of m lives in m's bucket,
`core.partitioning`): of its source's table, the rows whose time is before t. So between two snapshots it can
differ only if a row of m that differs in a column the features read (before or after the change) has a
time before t: the source's time when it is its table's own time, or one validated to come after it (a
release after its receipt: `TableSpec.ordered`). A table joined into a source's relation (a loan's principal
beside its month-end rows) is read with no time bound of its own: a changed row of it reaches m at every t.

The changed rows are found in the partitions whose content changed (`RawStore.changed_partitions`:
month and bucket), from their change files or by comparing them row by row between the snapshots
(`RawStore.changed_rows`). The rule is a bound: a value it calls stale may not have changed, one it keeps
cannot have (but for a changed row whose 64-bit hash collides with its old one's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from core.raw_store import RawStore
from core.schemas import TABLES
from features.definitions import SOURCES, Feature
from features.sql import by_source, source_tables, used_columns


@dataclass(frozen=True)
class Reads:
    """What features read of one raw table."""

    columns: frozenset[str]
    bounded: bool
    """Its rows reach only the times after their own time (else every time)."""


def reads(features: tuple[Feature, ...]) -> dict[str, Reads]:
    """The raw tables the features read: the columns, and whether their rows' time bounds what they reach."""
    out: dict[str, Reads] = {}
    for name, fs in by_source(features).items():
        source = SOURCES[name]
        spec = TABLES[source.table]
        words = set(re.findall(r"\w+", " ".join([source.time_column, source.relation,
                                                 *(expr for _, expr in used_columns(source, fs))])))
        own = {*words, spec.time_column, "merchant_id"} & set(spec.column_index)
        bounded = source.time_column == spec.time_column or (spec.time_column, source.time_column) in spec.ordered
        for table in source_tables(tuple(fs)):
            # A joined table is read through its relation, which may use any of its columns, at any time.
            read = Reads(frozenset(own), bounded) if table == source.table else Reads(
                frozenset(TABLES[table].column_index), False)
            seen = out.get(table, Reads(frozenset(), True))
            out[table] = Reads(seen.columns | read.columns, seen.bounded and read.bounded)
    return out


def changed_rows(now: RawStore, before: RawStore, changed: Mapping[str, set[tuple[str, int]]],
                 features: tuple[Feature, ...], con: duckdb.DuckDBPyConnection) -> dict[str, pd.DataFrame]:
    """Per raw table the features read, the merchants with a row that differs in a column they read between
    the two snapshots, with the earliest time of such a row (`merchant_id`, `first`). `changed`: the
    partitions whose content changed between them (`RawStore.changed_partitions`)."""
    out = {}
    for table, read in reads(features).items():
        moved = changed.get(table)
        if moved:
            time = TABLES[table].time_column
            rows = now.changed_rows(con, before, table, moved, read.columns, time)
            out[table] = con.execute(f"SELECT merchant_id, min({time}) AS first FROM ({rows}) "
                                     "GROUP BY merchant_id").df()
    return out


def stale(entities: pd.DataFrame, changes: Mapping[str, pd.DataFrame], features: tuple[Feature, ...]) -> np.ndarray:
    """For each entity row (merchant_id, as_of), whether the features' value as of that time may differ
    between two snapshots whose changed rows are `changes` (`changed_rows`)."""
    out = np.zeros(len(entities), dtype=bool)
    merchants = entities["merchant_id"].astype(str)
    as_of = pd.to_datetime(entities["as_of"]).astype("datetime64[us]")
    for table, read in reads(features).items():
        rows = changes.get(table)
        if rows is None or rows.empty:
            continue
        first = merchants.map(rows.set_index(rows["merchant_id"].astype(str))["first"].astype("datetime64[us]"))
        out |= (first.notna() & (as_of > first if read.bounded else True)).to_numpy()
    return out
