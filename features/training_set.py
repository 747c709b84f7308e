"""Point-in-time feature retrieval: entity rows (merchant_id, as_of, ...) in, the same rows plus features out.

Every feature sees only facts strictly before the row's own `as_of` (see `features.definitions`). The work
runs in DuckDB over the raw store's tables, in batches of merchants so memory stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd
from rich.progress import track

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.schemas import TABLES
from features.definitions import FEATURES, Feature
from features.sql import features_sql, source_tables

log = logging.getLogger(__name__)

KEYS = ["merchant_id", "as_of"]
DEFAULT_BATCH_ROWS = 200_000


def table_readers(raw_store: RawStore, con: duckdb.DuckDBPyConnection, names: Iterable[str] = (),
                  buckets: Sequence[int] | None = None) -> dict[str, str]:
    """Make the raw tables (default: those the features use) readable in `con`; their view names.

    Each reads the store's snapshot, so DuckDB pushes filters and projections into the scan of its files
    wherever they live; a table with no data reads as empty. `buckets`: only those merchant buckets' files
    (a partition of the work: every fact of a merchant is in its bucket)."""
    if not any(raw_store.has_table(name) for name in TABLES):
        raise ScfriskError(f"raw store {raw_store.root} holds no data; run `scfrisk ingest` first")
    out = {}
    for name in sorted(names or source_tables(FEATURES)):
        if not raw_store.has_table(name):
            log.warning("raw table %s has no data; features from it are empty", name)
        out[name] = raw_store.register(con, name, buckets)
    return out


def normalise_entities(entity_df: pd.DataFrame) -> pd.DataFrame:
    """Check the entity frame and give `as_of` one type: naive UTC microsecond timestamps."""
    missing = [c for c in KEYS if c not in entity_df.columns]
    if missing:
        raise ScfriskError(f"entity frame lacks column(s) {', '.join(missing)}; it needs merchant_id and as_of")
    clash = sorted(set(entity_df.columns) & {f.name for f in FEATURES})
    if clash:
        raise ScfriskError(f"entity frame already has feature column(s) {', '.join(clash)}; rename or drop them")
    for key in KEYS:
        n_null = int(entity_df[key].isna().sum())
        if n_null:
            raise ScfriskError(f"entity frame has {n_null} row(s) with an empty {key}")
    try:
        as_of = pd.to_datetime(entity_df["as_of"])
    except (ValueError, TypeError) as exc:
        raise ScfriskError(f"entity frame column as_of is not a timestamp: {exc}") from exc
    if as_of.dt.tz is not None:
        as_of = as_of.dt.tz_convert("UTC").dt.tz_localize(None)
    out = entity_df.copy()
    out["merchant_id"] = out["merchant_id"].astype(str)
    out["as_of"] = as_of.astype("datetime64[us]")
    return out


def _merchant_batches(entities: pd.DataFrame, batch_rows: int) -> list[pd.DataFrame]:
    """Split entities into batches of whole merchants, about `batch_rows` rows each."""
    n_batches = max(1, int(np.ceil(len(entities) / batch_rows)))
    if n_batches == 1:
        return [entities]
    codes = pd.factorize(entities["merchant_id"], sort=True)[0]
    return [part for _, part in entities.groupby(codes * n_batches // (codes.max() + 1), sort=True)]


def compute_features(
    entities: pd.DataFrame,
    tables: Mapping[str, str],
    batch_rows: int = DEFAULT_BATCH_ROWS,
    features: tuple[Feature, ...] = FEATURES,
    *,
    con: duckdb.DuckDBPyConnection,
) -> pd.DataFrame:
    """Features for distinct (merchant_id, as_of) pairs, one row each, columns in definition order.

    `features` may be a subset, as long as it includes what its derived features use. `con` is the
    connection `tables` can be read in (one where in-memory tables are registered): the caller's, with its
    budget and spill folder (`RawStore.connect`)."""
    sql = features_sql(tables, features)
    batches = _merchant_batches(entities[KEYS].drop_duplicates(), batch_rows)
    parts = []
    for batch in track(batches, description="features", disable=len(batches) < 2):
        con.register("batch", batch)
        con.execute(
            "CREATE OR REPLACE TEMP TABLE entities AS SELECT row_number() OVER () AS eid, * FROM batch"
        )
        parts.append(con.execute(sql).df())
        con.unregister("batch")
    return pd.concat(parts, ignore_index=True)


def get_training_set(
    entity_df: pd.DataFrame,
    raw_store: RawStore,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    buckets: Sequence[int] | None = None,
    features: tuple[Feature, ...] = FEATURES,
) -> pd.DataFrame:
    """The entity rows, in order and with every other column unchanged, plus the features as of each row.

    `buckets`: read only those merchant buckets of the raw store (the entities' merchants must be in them).
    `features`: a subset closed over what its derived features read (`features.definitions.with_inputs`), when
    the caller reads only those: the query computes and reads no more (the monitor's baselines read 5 of 80)."""
    entities = normalise_entities(entity_df)
    con = raw_store.connect()
    tables = table_readers(raw_store, con, source_tables(features), buckets=buckets)
    values = compute_features(entities, tables, batch_rows, features, con=con)
    log.info("computed %d features for %d entity rows", len(features), len(entities))
    return entities.merge(values, on=KEYS, how="left", validate="many_to_one")
