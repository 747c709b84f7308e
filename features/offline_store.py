"""Offline store: materialised feature snapshots as Parquet, reused while the data and definitions hold.

Layout under `[paths] feature_store` (a folder, or a URL on object storage: `OfflineStore.from_settings`):
    version=<feature_set_version>/as_of=<YYYY-MM-DDTHHMMSS>.parquet   one row per merchant onboarded before as_of
    version=<feature_set_version>/training_set.parquet               application outcomes + features
Each file carries `feature_set_version`, `as_of` and the raw `snapshot_id` in its Parquet metadata; a file is
reused only when both still match, so a new ingest or a changed definition recomputes it.

Each file is computed per merchant bucket of the raw store (`core.partitioning`: every fact of a merchant is
in its bucket, and no feature reads another merchant), each part by DuckDB over that bucket's files only,
then the parts are put in the entity order of the whole (`PART_ORDER`). `map_parts` runs the parts: a loop
here, or a flow's engine (`pipelines.compute.run_partitions`, Dask workers). The file is bit-equal either
way, and equal to one query over the whole store (the features' sums are exact: `features.definitions`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import duckdb
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from core import storage
from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import Settings
from core.storage import is_local, local_path
from features.definitions import feature_names, feature_set_version
from features.labels import application_outcomes, last_observation
from features.training_set import KEYS, get_training_set, table_readers

log = logging.getLogger(__name__)

META_KEYS = ("feature_set_version", "as_of", "raw_snapshot_id")
TRAINING_ORDER = ["as_of", "application_id"]
"""Order of the training set's rows (the label query's): the parts of the buckets are sorted back into it."""

PartitionMap = Callable[[Callable[[Any], pd.DataFrame], list[Any], str], list[pd.DataFrame]]
"""`map_parts(fn, items, label)`: `fn` of every item, in order (`pipelines.compute.run_partitions`)."""


def in_turn(fn: Callable[[Any], pd.DataFrame], items: list[Any], label: str) -> list[pd.DataFrame]:
    """The parts one after the other in this process (outside a flow)."""
    return [fn(item) for item in items]


def combine(parts: list[pd.DataFrame], order: list[str]) -> pd.DataFrame:
    """The buckets' parts as one frame in the order of the whole (keys unique across parts)."""
    filled = [part for part in parts if not part.empty] or parts[:1]
    return pd.concat(filled, ignore_index=True).sort_values(order, kind="stable", ignore_index=True)


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


def read_metadata(path: Path | str, filesystem: pa_fs.FileSystem | None = None) -> dict[str, str]:
    meta = pq.read_schema(path, filesystem=filesystem).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode() in META_KEYS}


class OfflineStore:
    """Feature snapshots of one raw store, keyed by as_of, for the current feature-set version.

    The store is a folder or a URL (`core.storage`): files are read and written through pyarrow on the
    store's file system (Arrow's own on a local disk, fsspec's on object storage), so no DuckDB extension
    is needed. Locations are `Path`s in a local store and URLs on object storage."""

    def __init__(self, root: Path | str, raw_store: RawStore, map_parts: PartitionMap = in_turn,
                 storage_options: Mapping[str, str] | None = None) -> None:
        """`storage_options`: delta-rs's names, as for `RawStore`."""
        text = str(root)
        self.root: Path | str = local_path(text) if is_local(text) else text
        self.fs, _ = storage.filesystem(str(self.root), storage_options)
        self.arrow_fs = storage.arrow_filesystem(self.fs)
        self.raw_store = raw_store
        self.version = feature_set_version()
        self.map_parts = map_parts

    @classmethod
    def from_settings(cls, settings: Settings, raw_store: RawStore | None = None,
                      map_parts: PartitionMap = in_turn) -> OfflineStore:
        """The workspace's feature store (`[paths] feature_store`) over its raw store (by default the
        workspace's own)."""
        return cls(settings.store_url("feature_store"), raw_store or RawStore.from_settings(settings), map_parts,
                   settings.storage_options("feature_store"))

    def location(self, *parts: str) -> Path | str:
        """A file or folder of the store: a path in a local store, a URL on object storage."""
        if isinstance(self.root, Path):
            return self.root.joinpath(*parts)
        return "/".join([self.root.rstrip("/"), *parts])

    def _path(self, location: Path | str) -> str:
        """The location as the store's file systems name it."""
        return fsspec.core.strip_protocol(str(location))

    @property
    def version_dir(self) -> Path | str:
        return self.location(f"version={self.version}")

    def snapshot_path(self, as_of: pd.Timestamp) -> Path | str:
        return self.location(f"version={self.version}", f"as_of={pd.Timestamp(as_of):%Y-%m-%dT%H%M%S}.parquet")

    def snapshot_files(self, version: str) -> list[Path | str]:
        """The monthly snapshots kept for a feature-set version, oldest first."""
        folder = self._path(self.location(f"version={version}"))
        names = sorted(PurePosixPath(p).name for p in self.fs.glob(f"{folder}/as_of=*.parquet"))
        return [self.location(f"version={version}", name) for name in names]

    def read_file(self, location: Path | str, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(self._path(location), columns=columns, filesystem=self.arrow_fs)

    def write(self, frame: pd.DataFrame, location: Path | str, metadata: dict[str, str]) -> Path | str:
        """Write the frame with its metadata so that a reader never sees half a file: a temporary file
        renamed on a local disk; on object storage one object, which appears whole when its upload ends."""
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        path = self._path(location)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not isinstance(self.root, Path):
            pq.write_table(table, path, filesystem=self.arrow_fs)
            return location
        pq.write_table(table, path + ".tmp", filesystem=self.arrow_fs)
        Path(path + ".tmp").replace(path)
        return location

    def copy(self, source: Path | str, target: Path | str) -> Path | str:
        """Replace `target` by a copy of `source`, whole or not at all (a rename, or one object copy)."""
        src, dst = self._path(source), self._path(target)
        self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        if not isinstance(self.root, Path):
            self.fs.copy(src, dst)
            return target
        shutil.copyfile(src, dst + ".tmp")
        Path(dst + ".tmp").replace(dst)
        return target

    def local_copy(self, location: Path | str, folder: Path) -> Path:
        """A file of the store on this machine's disk: itself in a local store, else downloaded into `folder`."""
        if isinstance(location, Path):
            return location
        target = folder / PurePosixPath(self._path(location)).name
        self.fs.get_file(self._path(location), str(target))
        return target

    def _is_current(self, location: Path | str) -> bool:
        snapshot = self.raw_store.snapshot_id
        return (
            snapshot is not None
            and self.fs.isfile(self._path(location))
            and read_metadata(self._path(location), self.arrow_fs).get("raw_snapshot_id") == snapshot
        )

    def metadata(self, as_of: str) -> dict[str, str]:
        return {"feature_set_version": self.version, "as_of": as_of,
                "raw_snapshot_id": str(self.raw_store.snapshot_id)}

    def _by_bucket(self, fn: Callable[..., pd.DataFrame], label: str, *args: Any) -> list[pd.DataFrame]:
        """`fn(raw_store, *args, bucket)` of every bucket, on the store pinned to its snapshot (what a worker
        reads while the next batch may be committing)."""
        buckets = list(range(self.raw_store.buckets))
        return self.map_parts(partial(fn, self.raw_store.pinned(), *args), buckets, label)

    def materialize(self, as_of: pd.Timestamp | str) -> Path | str:
        """The snapshot for as_of, computed only if missing or stale."""
        as_of = pd.Timestamp(as_of)
        path = self.snapshot_path(as_of)
        if self._is_current(path):
            log.info("reusing feature snapshot %s", path)
            return path
        features = combine(self._by_bucket(snapshot_part, f"features as of {as_of:%Y-%m-%d}", as_of), KEYS)
        log.info("materialised %d merchants as of %s", len(features), as_of)
        return self.write(features, path, self.metadata(as_of.isoformat()))

    def read(self, as_of: pd.Timestamp | str) -> pd.DataFrame:
        return self.read_file(self.materialize(as_of))

    def training_set(self, horizon_months: int) -> Path | str:
        """Every loan's outcome with its features as of the application, computed only when stale."""
        path = self.location(f"version={self.version}", f"training_set_h{int(horizon_months)}.parquet")
        if self._is_current(path):
            log.info("reusing training set %s", path)
            return path
        parts = self._by_bucket(training_part, "training set", int(horizon_months), last_observation(self.raw_store))
        return self.write(combine(parts, TRAINING_ORDER), path, self.metadata("applied_at"))


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
    offline = OfflineStore.from_settings(settings)
    store, horizon = offline.raw_store, settings.model.label_horizon_months
    frame = offline.read_file(offline.training_set(horizon))
    complete = frame.loc[frame["outcome_complete"], [*ENTITY_COLUMNS, *feature_names()]]
    if complete.empty:
        raise ScfriskError(f"none of the {len(frame)} loans in {store.root} has a complete {horizon}-month "
                           "outcome yet; ingest a longer history")
    return complete.reset_index(drop=True)
