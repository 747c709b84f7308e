"""Offline store: materialised feature snapshots as Parquet, reused while the data and definitions hold.

Layout under `settings.path("feature_store")`:
    version=<feature_set_version>/as_of=<YYYY-MM-DDTHHMMSS>.parquet   one row per merchant onboarded before as_of
    version=<feature_set_version>/training_set.parquet               application outcomes + features
Each file carries `feature_set_version`, `as_of` and the raw `snapshot_id` in its Parquet metadata; a file is
reused only when both still match, so a new ingest or a changed definition recomputes it.

Each file is computed per merchant bucket of the raw store (`core.partitioning`: every fact of a merchant is
in its bucket, and no feature reads another merchant), each part by DuckDB over that bucket's files only,
written to a part file by the process that computed it, then the parts are merged into the entity order of
the whole (`write_in_order`: the flow's process holds the keys and a bounded number of rows, not the table).
`map_parts` runs the parts: a loop here, or a flow's engine (`pipelines.compute.run_partitions`, Dask
workers). The file is bit-equal either way, and equal to one query over the whole store (the features' sums
are exact: `features.definitions`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import Settings
from features.definitions import feature_names, feature_set_version
from features.labels import application_outcomes, last_observation
from features.training_set import KEYS, get_training_set, table_readers

log = logging.getLogger(__name__)

META_KEYS = ("feature_set_version", "as_of", "raw_snapshot_id")
TRAINING_ORDER = ["as_of", "application_id"]
"""Order of the training set's rows (the label query's): the parts of the buckets are sorted back into it."""

PartitionMap = Callable[[Callable[[Any], Any], list[Any], str], list[Any]]
"""`map_parts(fn, items, label)`: `fn` of every item, in order (`pipelines.compute.run_partitions`)."""


def in_turn(fn: Callable[[Any], Any], items: list[Any], label: str) -> list[Any]:
    """The parts one after the other in this process (outside a flow)."""
    return [fn(item) for item in items]


PART_ROWS = 65_536
"""Rows per row group of a bucket's part file, and per batch read back from it while merging."""
WRITE_ROWS = 262_144
"""Rows of the whole file the merge holds (and writes as one row group) at a time: the flow's memory bound."""


def stored_part(fn: Callable[[int], pd.DataFrame], order: list[str], directory: Path, bucket: int) -> Path:
    """`fn(bucket)` in the whole's order, written to its own file by the process that computed it (a Dask
    worker: only the path goes back to the flow)."""
    path = directory / f"bucket={bucket:05d}.parquet"
    frame = fn(bucket).sort_values(order, kind="stable", ignore_index=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=PART_ROWS)
    return path


def write_in_order(parts: list[Path], order: list[str], path: Path, metadata: dict[str, str]) -> Path:
    """The buckets' part files (each in `order`, keys unique across them) as one Parquet file in the order of
    the whole, atomically; memory: the key columns of every row, and `WRITE_ROWS` rows of the others.

    The same rows and types as sorting the concatenated parts (a type that differs between parts, such as
    integers in one bucket and floats where another has a missing value, is promoted as pandas would)."""
    files = [pq.ParquetFile(part) for part in parts]
    files = [f for f in files if f.metadata.num_rows] or files[:1]  # an empty bucket's types are guesses
    schema = pa.unify_schemas([f.schema_arrow for f in files], promote_options="permissive")
    keys = pa.concat_tables([f.read(columns=order).cast(pa.schema([schema.field(c) for c in order]))
                             for f in files])
    source = np.repeat(np.arange(len(files)), [f.metadata.num_rows for f in files])
    source = source[pc.sort_indices(keys, [(c, "ascending") for c in order]).to_numpy()]
    del keys
    readers = [_Rows(f, schema) for f in files]
    largest = max(files, key=lambda f: f.metadata.num_rows)  # its pandas metadata, not an empty bucket's
    schema = schema.with_metadata({**(largest.schema_arrow.metadata or {}),
                                   **{k.encode(): v.encode() for k, v in metadata.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(source), WRITE_ROWS):
            chunk = source[start:start + WRITE_ROWS]
            rows = pa.concat_tables([reader.take(n) for reader, n in
                                     zip(readers, np.bincount(chunk, minlength=len(files)), strict=True)])
            # rows holds each part's next rows, part after part; the whole's order interleaves them
            grouped = np.argsort(chunk, kind="stable")
            picks = np.empty_like(grouped)
            picks[grouped] = np.arange(len(chunk))
            writer.write_table(rows.take(picks).replace_schema_metadata(schema.metadata), row_group_size=WRITE_ROWS)
    tmp.replace(path)
    return path


class _Rows:
    """A part file read front to back, a given number of rows at a time."""

    def __init__(self, file: pq.ParquetFile, schema: pa.Schema) -> None:
        self.batches = file.iter_batches(batch_size=PART_ROWS)
        self.schema = schema
        self.buffer = pa.Table.from_batches([], schema=file.schema_arrow).cast(schema)

    def take(self, n: int) -> pa.Table:
        while self.buffer.num_rows < n:
            batch = pa.Table.from_batches([next(self.batches)]).cast(self.schema)
            self.buffer = pa.concat_tables([self.buffer, batch])
        out, self.buffer = self.buffer.slice(0, n), self.buffer.slice(n)
        return out


def merchants_as_of(raw_store: RawStore, as_of: pd.Timestamp, buckets: Sequence[int] | None = None) -> pd.DataFrame:
    """Entity frame of every merchant (of those buckets) onboarded strictly before as_of."""
    con = duckdb.connect()
    merchants = table_readers(raw_store, con, ["merchants"], buckets)["merchants"]
    return con.execute(
        f"SELECT merchant_id, ?::TIMESTAMP AS as_of FROM {merchants} "
        "WHERE onboarded_at < ?::TIMESTAMP ORDER BY merchant_id",
        [pd.Timestamp(as_of).to_pydatetime()] * 2,
    ).df()


def snapshot_part(raw_store: RawStore, as_of: pd.Timestamp, bucket: int) -> pd.DataFrame:
    """One bucket's merchants with their features as of `as_of`, from that bucket's files."""
    return get_training_set(merchants_as_of(raw_store, as_of, [bucket]), raw_store, buckets=[bucket])


def training_part(raw_store: RawStore, horizon_months: int, observed_until: datetime | None,
                  bucket: int) -> pd.DataFrame:
    """One bucket's loan outcomes (complete by the store-wide `observed_until`) with their features as of
    each application."""
    outcomes = application_outcomes(raw_store, horizon_months, [bucket], observed_until)
    return get_training_set(outcomes, raw_store, buckets=[bucket])


def read_metadata(path: Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode() in META_KEYS}


def write_with_metadata(frame: pd.DataFrame, path: Path, metadata: dict[str, str]) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a snapshot."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


class OfflineStore:
    """Feature snapshots of one raw store, keyed by as_of, for the current feature-set version."""

    def __init__(self, root: Path | str, raw_store: RawStore, map_parts: PartitionMap = in_turn) -> None:
        self.root = Path(root)
        self.raw_store = raw_store
        self.version = feature_set_version()
        self.map_parts = map_parts

    @property
    def version_dir(self) -> Path:
        return self.root / f"version={self.version}"

    def snapshot_path(self, as_of: pd.Timestamp) -> Path:
        return self.version_dir / f"as_of={pd.Timestamp(as_of):%Y-%m-%dT%H%M%S}.parquet"

    def _is_current(self, path: Path) -> bool:
        snapshot = self.raw_store.snapshot_id
        return (
            snapshot is not None
            and path.is_file()
            and read_metadata(path).get("raw_snapshot_id") == snapshot
        )

    def metadata(self, as_of: str) -> dict[str, str]:
        return {"feature_set_version": self.version, "as_of": as_of,
                "raw_snapshot_id": str(self.raw_store.snapshot_id)}

    def _by_bucket(self, path: Path, order: list[str], as_of: str, label: str, fn: Callable[..., pd.DataFrame],
                   *args: Any) -> Path:
        """The file at `path` from `fn(raw_store, *args, bucket)` of every bucket, on the store pinned to its
        snapshot (what a worker reads while the next batch may be committing): each bucket's rows written to a
        part file where they are computed, then merged in `order` (`write_in_order`)."""
        parts_dir = path.parent / f".{path.stem}.parts"
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(parents=True)
        try:
            compute = partial(fn, self.raw_store.pinned(), *args)
            parts = self.map_parts(partial(stored_part, compute, order, parts_dir),
                                   list(range(self.raw_store.buckets)), label)
            return write_in_order(parts, order, path, self.metadata(as_of))
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)

    def materialize(self, as_of: pd.Timestamp | str) -> Path:
        """The snapshot for as_of, computed only if missing or stale."""
        as_of = pd.Timestamp(as_of)
        path = self.snapshot_path(as_of)
        if self._is_current(path):
            log.info("reusing feature snapshot %s", path.name)
            return path
        self._by_bucket(path, KEYS, as_of.isoformat(), f"features as of {as_of:%Y-%m-%d}", snapshot_part, as_of)
        log.info("materialised %d merchants as of %s", pq.ParquetFile(path).metadata.num_rows, as_of)
        return path

    def read(self, as_of: pd.Timestamp | str) -> pd.DataFrame:
        return pd.read_parquet(self.materialize(as_of))

    def training_set(self, horizon_months: int) -> Path:
        """Every loan's outcome with its features as of the application, computed only when stale."""
        path = self.version_dir / f"training_set_h{int(horizon_months)}.parquet"
        if self._is_current(path):
            log.info("reusing training set %s", path.name)
            return path
        return self._by_bucket(path, TRAINING_ORDER, "applied_at", "training set", training_part, int(horizon_months),
                               last_observation(self.raw_store))


def month_starts(raw_store: RawStore) -> list[pd.Timestamp]:
    """First instant of every month after the first order, up to the month after the last one."""
    con = duckdb.connect()
    orders = table_readers(raw_store, con, ["orders"])["orders"]
    first, last = con.execute(f"SELECT min(ordered_at), max(ordered_at) FROM {orders}").fetchone()
    if first is None:
        return []
    return list(pd.date_range(pd.Timestamp(first).to_period("M").to_timestamp() + pd.offsets.MonthBegin(1),
                              pd.Timestamp(last).to_period("M").to_timestamp() + pd.offsets.MonthBegin(1),
                              freq="MS"))


ENTITY_COLUMNS = ["application_id", "loan_id", "merchant_id", "as_of", "product", "defaulted"]
"""Label-table columns the feature-store training run keeps besides the features themselves."""


def training_frame(settings: Settings) -> pd.DataFrame:
    """Completed loan outcomes with point-in-time features as of each application (the offline store's
    training set, reused while the raw snapshot and the feature definitions are unchanged)."""
    store = RawStore(settings.path("raw_store"))
    horizon = settings.model.label_horizon_months
    frame = pd.read_parquet(OfflineStore(settings.path("feature_store"), store).training_set(horizon))
    complete = frame.loc[frame["outcome_complete"], [*ENTITY_COLUMNS, *feature_names()]]
    if complete.empty:
        raise ScfriskError(f"none of the {len(frame)} loans in {store.root} has a complete {horizon}-month "
                           "outcome yet; ingest a longer history")
    return complete.reset_index(drop=True)
