"""Which point-in-time feature values a change of the raw store can have reached: what a cache of features
(or of a score computed from them) must recompute when the raw store moves to a new snapshot.

A feature of merchant m as of t reads m's rows only, and every fact of m lives in m's bucket
(`core.partitioning`). A source's facts are its table's rows whose time is before t; such a row lives in the
partition of the month of its table's time column, so a changed partition (month, bucket) of that table can
reach (m, t) only when the bucket is m's and the month is no later than t's. That holds when the source's time
is the table's partition time, or a time validated to come after it (a release after its receipt:
`TableSpec.ordered`). A table joined into a source's relation (a loan's principal beside its month-end
rows) is read with no time bound of its own: a change of it in m's bucket reaches every t. The rule is a
bound, not a diff: a value it calls stale may not have changed, one it keeps cannot have.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from core.partitioning import merchant_bucket, month_key
from core.schemas import TABLES
from features.definitions import SOURCES, Feature
from features.sql import by_source, source_tables

EVERY_MONTH = ""
"""Sorts before every month (`YYYY-MM`): a change reaching every time."""


def reach(features: tuple[Feature, ...]) -> dict[str, bool]:
    """The raw tables the features read, each with whether its rows reach only times after their month."""
    out: dict[str, bool] = {}
    for name, fs in by_source(features).items():
        source = SOURCES[name]
        spec = TABLES[source.table]
        bounded = source.time_column == spec.time_column or (spec.time_column, source.time_column) in spec.ordered
        out[source.table] = out.get(source.table, True) and bounded
        for joined in source_tables(tuple(fs)) - {source.table}:
            out[joined] = False
    return out


def first_changed_month(changed: Mapping[str, set[tuple[str, int]]],
                        features: tuple[Feature, ...]) -> dict[int, str]:
    """Per bucket, the earliest month from which the features' values may differ (`EVERY_MONTH`: any)."""
    out: dict[int, str] = {}
    for table, bounded in reach(features).items():
        for month, bucket in changed.get(table, ()):
            first = month if bounded and len(month) == 7 else EVERY_MONTH  # an unreadable month reaches all
            out[bucket] = min(out.get(bucket, first), first)
    return out


def stale(entities: pd.DataFrame, changed: Mapping[str, set[tuple[str, int]]], features: tuple[Feature, ...],
          buckets: int) -> np.ndarray:
    """For each entity row (merchant_id, as_of), whether the features' value as of that time may differ
    between two raw snapshots whose changed partitions (`features.daily_store.changed_partitions`) are
    `changed`, in a store of `buckets` merchant buckets."""
    first = first_changed_month(changed, features)
    if not first or not len(entities):
        return np.zeros(len(entities), dtype=bool)
    bucket = merchant_bucket(pa.array(entities["merchant_id"].astype(str)), buckets).to_numpy()
    since = pd.Series(bucket).map(first)
    month = pd.Series(month_key(pa.array(pd.to_datetime(entities["as_of"]).astype("datetime64[us]"))).to_pylist())
    return (since.notna() & (month >= since.fillna(""))).to_numpy()
