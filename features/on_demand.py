"""On-demand features: one merchant's raw records in, its feature row as of a time out.

A merchant outside the online store can be scored from its own records (its profile, orders, behaviour
events, ...) instead of 80 engineered values. The records come in the columns of ingestion
(`core.schemas`) and go through ingestion's steps: read as text and cast to each column's type, as a
CSV batch is, then checked by the data model's rules (`core.rules.spec_rules`, evaluated in Arrow
because GX takes a second per request). The features are then computed by the offline store's query
(`features.sql`) run by DuckDB on the records as in-memory Arrow tables, so the same facts at the same
as_of give the same row as `OfflineStore.materialize`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import ScfriskError
from core.rules import DataValidationError, Failure, check_records, spec_rules
from core.schemas import MERCHANTS, TABLES, TableSpec, conform
from core.sql import duckdb_connect
from features.definitions import FEATURES, feature_names
from features.sql import source_tables
from features.training_set import compute_features, normalise_entities

if TYPE_CHECKING:
    from core.settings import Settings

RECORD_TABLES: tuple[str, ...] = tuple(name for name in TABLES if name in source_tables(FEATURES))
"""The raw tables the features read, in dependency order: what a request's records may hold."""
PROFILE = MERCHANTS.name
"""The table holding the merchant's one profile row; every other record must belong to it."""

Records = Mapping[str, Sequence[Mapping[str, Any]]]
"""Rows (column -> JSON value) by raw table name."""


class RecordsError(ScfriskError):
    """Records that cannot give a feature row, for a reason outside the table rules (e.g. the as_of)."""


class InvalidRecords(DataValidationError):
    """Records that break the data model's rules; `failures` names table, column, rule and row count."""

    def __init__(self, failures: list[Failure]) -> None:
        self.failures = failures
        super().__init__(f"records rejected, {len(failures)} rule(s) failed: " + "; ".join(map(str, failures)))


@dataclass(frozen=True)
class MerchantFeatures:
    """The feature row computed from one merchant's records."""

    merchant_id: str
    as_of: datetime
    features: dict[str, Any]
    """Every feature in definition order; None where unknown (as in the online store)."""


def records_table(spec: TableSpec, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """JSON rows as a table of the spec's columns (null where a row omits one), then any unknown columns
    for the column-set rule to name. Values are read as ingestion reads CSV: as text, cast to the column's
    type when every value reads as it, else left as text so the type rule counts those that do not."""
    unknown = sorted({name for row in rows for name in row} - set(spec.column_index))
    text = {name: pa.array([_text(row.get(name)) for row in rows], pa.string())
            for name in [*spec.column_index, *unknown]}
    return conform(pa.table(text), spec, from_text=True)


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None  # a missing value, as pandas reads NaN at ingestion
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def validated_tables(
    records: Records, *, now: datetime, allow_future_seconds: int, max_examples: int
) -> dict[str, pa.Table]:
    """Every record table (empty when not sent), checked by the rules of ingestion with `now` bounding the
    timestamps and foreign keys resolved within the records; raises `InvalidRecords` listing every failure."""
    unknown = sorted(set(records) - set(RECORD_TABLES))
    if unknown:
        raise RecordsError(f"unknown record table(s) {unknown}; the features read: {', '.join(RECORD_TABLES)}")
    tables = {name: records_table(TABLES[name], records.get(name, ())) for name in RECORD_TABLES}
    failures: list[Failure] = []
    for name, table in tables.items():
        spec = TABLES[name]
        keys = {(fk.table, fk.ref_column): _keys(tables[fk.table], TABLES[fk.table], fk.ref_column)
                for fk in spec.foreign_keys}
        rules = spec_rules(spec, now=now, allow_future_seconds=allow_future_seconds, reference_keys=keys)
        failures += check_records(table, spec, rules, max_examples)
    if failures:
        raise InvalidRecords(failures)
    return tables


def _keys(table: pa.Table, spec: TableSpec, column: str) -> pa.Array:
    """The distinct keys a foreign key may point at (none when the column is mistyped: its rule says so)."""
    values, wanted = table.column(column), spec.column_index[column].type
    return pc.unique(values.drop_null().combine_chunks()) if values.type == wanted else pa.array([], wanted)


def merchant_features(tables: Mapping[str, pa.Table], as_of: datetime,
                      settings: Settings | None = None) -> MerchantFeatures:
    """The features of the one merchant of validated record tables, as of `as_of` (naive UTC). `settings`: the
    service's, whose memory budget and spill folder under `SCFRISK_HOME` the query gets (`duckdb_connect`)."""
    profile = tables[PROFILE]
    if profile.num_rows != 1:
        raise RecordsError(f"records must hold exactly one {PROFILE} row (the merchant's profile), "
                           f"got {profile.num_rows}")
    merchant, onboarded = (profile.column(c)[0].as_py() for c in ("merchant_id", MERCHANTS.time_column))
    if onboarded >= as_of:
        raise RecordsError(f"merchant {merchant} was onboarded at {onboarded.isoformat()}, not before as_of "
                           f"{as_of.isoformat()}: it has no features then")
    con = duckdb_connect(settings)
    try:
        for name, table in tables.items():
            con.register(f"records_{name}", table)
        entities = normalise_entities(pd.DataFrame({"merchant_id": [merchant], "as_of": [as_of]}))
        row = compute_features(entities, {name: f"records_{name}" for name in tables}, con=con)
    finally:
        con.close()
    values = row.iloc[0]
    return MerchantFeatures(merchant, as_of, {name: _python(values[name]) for name in feature_names()})


def _python(value: Any) -> Any:
    """A JSON value: NaN (unknown) becomes None, numpy scalars Python ones."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def features_from_records(
    records: Records, as_of: datetime, *, now: datetime, allow_future_seconds: int = 0, max_examples: int = 5,
    settings: Settings | None = None,
) -> MerchantFeatures:
    """`validated_tables`, then `merchant_features`: the on-demand path from a request's records."""
    tables = validated_tables(records, now=now, allow_future_seconds=allow_future_seconds,
                              max_examples=max_examples)
    return merchant_features(tables, as_of, settings)
