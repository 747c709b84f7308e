"""Offline store: materialised feature snapshots as Parquet, reused while the data and definitions hold.

Layout under `[paths] feature_store` (a folder, or a URL on object storage: `OfflineStore.from_settings`):
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from core import storage
from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import Settings
from core.sql import fetch_one
from core.storage import is_local, local_path
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


def stored_part(fn: Callable[[int], pd.DataFrame], order: list[str], directory: str,
                filesystem: pa_fs.FileSystem, bucket: int) -> str:
    """`fn(bucket)` in the whole's order, written to its own file (in `directory` of the store's file system)
    by the process that computed it (a Dask worker: only the path goes back to the flow)."""
    path = f"{directory}/bucket={bucket:05d}.parquet"
    frame = fn(bucket).sort_values(order, kind="stable", ignore_index=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=PART_ROWS,
                   filesystem=filesystem)
    return path


def write_in_order(parts: list[str], order: list[str], path: str, metadata: dict[str, str],
                   filesystem: pa_fs.FileSystem | None = None) -> str:
    """The buckets' part files (each in `order`, keys unique across them) as one Parquet file in the order of
    the whole (`write_merged`); memory: the key columns of every row, and `WRITE_ROWS` rows.

    The same rows and types as sorting the concatenated parts (a type that differs between parts, such as
    integers in one bucket and floats where another has a missing value, is promoted as pandas would)."""
    files = [pq.ParquetFile(part, filesystem=filesystem) for part in parts]
    filled = [i for i, f in enumerate(files) if f.metadata.num_rows]
    schema = _schema(files)
    keys = pa.concat_tables([files[i].read(columns=order).cast(pa.schema([schema.field(c) for c in order]))
                             for i in filled] or [pa.table({c: pa.array([], schema.field(c).type) for c in order})])
    source = np.repeat(np.array(filled, dtype=np.int64), [files[i].metadata.num_rows for i in filled])
    source = source[pc.sort_indices(keys, [(c, "ascending") for c in order]).to_numpy()]
    del keys
    return write_merged(parts, (source[s:s + WRITE_ROWS] for s in range(0, len(source), WRITE_ROWS)), path,
                        metadata, filesystem)


def write_merged(parts: list[str], source: Iterable[np.ndarray], path: str, metadata: dict[str, str],
                 filesystem: pa_fs.FileSystem | None = None, out_filesystem: pa_fs.FileSystem | None = None) -> str:
    """Part files (on `filesystem`) as one Parquet file (on `out_filesystem`, by default the same) whose rows
    come, in turn, from the parts `source` names (chunks of at most `WRITE_ROWS` part indices, each part's rows
    taken front to back), whole or not at all (a temporary file renamed on a local disk; on object storage one
    object, which appears when its upload ends); memory: one chunk's rows. Each chunk is one row group; types
    differing between parts are promoted as pandas would."""
    out_filesystem = out_filesystem or filesystem
    files = [pq.ParquetFile(part, filesystem=filesystem) for part in parts]
    schema = _schema(files)
    readers = [_Rows(f, schema) for f in files]
    largest = max(files, key=lambda f: f.metadata.num_rows)  # its pandas metadata, not an empty bucket's
    schema = schema.with_metadata({**(largest.schema_arrow.metadata or {}),
                                   **{k.encode(): v.encode() for k, v in metadata.items()}})
    local = out_filesystem is None or isinstance(out_filesystem, pa_fs.LocalFileSystem)
    tmp = f"{path}.tmp" if local else path
    with pq.ParquetWriter(tmp, schema, filesystem=out_filesystem) as writer:
        for chunk in source:
            rows = pa.concat_tables([reader.take(n) for reader, n in
                                     zip(readers, np.bincount(chunk, minlength=len(files)), strict=True)])
            # rows holds each part's next rows, part after part; the whole's order interleaves them
            grouped = np.argsort(chunk, kind="stable")
            picks = np.empty_like(grouped)
            picks[grouped] = np.arange(len(chunk))
            writer.write_table(rows.take(picks).replace_schema_metadata(schema.metadata), row_group_size=WRITE_ROWS)
    if local:
        Path(tmp).replace(path)
    return path


def _schema(files: list[pq.ParquetFile]) -> pa.Schema:
    """The parts' common schema; an empty bucket's types are guesses, so only filled parts count."""
    filled = [f for f in files if f.metadata.num_rows] or files[:1]
    return pa.unify_schemas([f.schema_arrow for f in filled], promote_options="permissive")


def read_rows(path: str, start: int, stop: int, filesystem: pa_fs.FileSystem | None = None) -> pd.DataFrame:
    """Rows [start, stop) of a Parquet file, as pandas reads them from the whole file, reading only the row
    groups that hold them: a task's share of a store file, named by offsets so the flow never holds the rows."""
    file = pq.ParquetFile(path, filesystem=filesystem)
    sizes = np.array([file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)], dtype=np.int64)
    ends = np.cumsum(sizes)
    groups = np.flatnonzero((ends - sizes < stop) & (ends > start))
    if not len(groups):
        return file.schema_arrow.empty_table().to_pandas()
    table = file.read_row_groups(groups.tolist())
    return table.slice(start - int(ends[groups[0]] - sizes[groups[0]]), stop - start).to_pandas()


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
    con = raw_store.connect()
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


def is_monthly(snapshot: Path | str) -> bool:
    """A snapshot as of a month's first midnight: the one `features build` writes for that month (a daily
    refresh on the 1st writes the same features). The risk report compares these, not the days between."""
    return PurePosixPath(str(snapshot)).name.endswith("-01T000000.parquet")


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

    def arrow_path(self, location: Path | str) -> str:
        """The location as the store's file systems name it; a name already stripped stays as it is (fsspec's
        module-level `strip_protocol` took `bucket/key` for a path in the working directory)."""
        return type(self.fs)._strip_protocol(str(location))

    @property
    def version_dir(self) -> Path | str:
        return self.location(f"version={self.version}")

    def snapshot_path(self, as_of: pd.Timestamp) -> Path | str:
        return self.location(f"version={self.version}", f"as_of={pd.Timestamp(as_of):%Y-%m-%dT%H%M%S}.parquet")

    def snapshot_files(self, version: str) -> list[Path | str]:
        """The snapshots kept for a feature-set version (monthly and the refresh's daily ones), oldest first."""
        folder = self.arrow_path(self.location(f"version={version}"))
        names = sorted(PurePosixPath(p).name for p in self.fs.glob(f"{folder}/as_of=*.parquet"))
        return [self.location(f"version={version}", name) for name in names]

    def read_file(self, location: Path | str, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(self.arrow_path(location), columns=columns, filesystem=self.arrow_fs)

    def write(self, frame: pd.DataFrame, location: Path | str, metadata: dict[str, str]) -> Path | str:
        """Write the frame with its metadata so that a reader never sees half a file: a temporary file
        renamed on a local disk; on object storage one object, which appears whole when its upload ends."""
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        path = self.arrow_path(location)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not isinstance(self.root, Path):
            pq.write_table(table, path, filesystem=self.arrow_fs)
            return location
        pq.write_table(table, path + ".tmp", filesystem=self.arrow_fs)
        Path(path + ".tmp").replace(path)
        return location

    def copy(self, source: Path | str, target: Path | str) -> Path | str:
        """Replace `target` by a copy of `source`, whole or not at all (a rename, or one object copy)."""
        src, dst = self.arrow_path(source), self.arrow_path(target)
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
        target = folder / PurePosixPath(self.arrow_path(location)).name
        self.fs.get_file(self.arrow_path(location), str(target))
        return target

    def _is_current(self, location: Path | str) -> bool:
        snapshot = self.raw_store.snapshot_id
        return (
            snapshot is not None
            and self.fs.isfile(self.arrow_path(location))
            and read_metadata(self.arrow_path(location), self.arrow_fs).get("raw_snapshot_id") == snapshot
        )

    def metadata(self, as_of: str) -> dict[str, str]:
        return {"feature_set_version": self.version, "as_of": as_of,
                "raw_snapshot_id": str(self.raw_store.snapshot_id)}

    def _by_bucket(self, location: Path | str, order: list[str], as_of: str, label: str,
                   fn: Callable[..., pd.DataFrame], *args: Any) -> Path | str:
        """The file at `location` from `fn(raw_store, *args, bucket)` of every bucket, on the store pinned to
        its snapshot (what a worker reads while the next batch may be committing): each bucket's rows written to
        a part file where they are computed, then merged in `order` (`write_in_order`)."""
        path = self.arrow_path(location)
        folder, name = path.rsplit("/", 1)
        parts_dir = f"{folder}/.{name.removesuffix('.parquet')}.parts"
        if self.fs.exists(parts_dir):  # left by a run that stopped
            self.fs.rm(parts_dir, recursive=True)
        self.fs.makedirs(parts_dir, exist_ok=True)
        try:
            compute = partial(fn, self.raw_store.pinned(), *args)
            parts = self.map_parts(partial(stored_part, compute, order, parts_dir, self.arrow_fs),
                                   list(range(self.raw_store.buckets)), label)
            write_in_order(parts, order, path, self.metadata(as_of), self.arrow_fs)
            return location
        finally:
            if self.fs.exists(parts_dir):
                self.fs.rm(parts_dir, recursive=True)

    def materialize(self, as_of: pd.Timestamp | str) -> Path | str:
        """The snapshot for as_of, computed only if missing or stale."""
        as_of = pd.Timestamp(as_of)
        path = self.snapshot_path(as_of)
        if self._is_current(path):
            log.info("reusing feature snapshot %s", path)
            return path
        self._by_bucket(path, KEYS, as_of.isoformat(), f"features as of {as_of:%Y-%m-%d}", snapshot_part, as_of)
        rows = pq.ParquetFile(self.arrow_path(path), filesystem=self.arrow_fs).metadata.num_rows
        log.info("materialised %d merchants as of %s", rows, as_of)
        return path

    def read(self, as_of: pd.Timestamp | str) -> pd.DataFrame:
        return self.read_file(self.materialize(as_of))

    def training_set(self, horizon_months: int) -> Path | str:
        """Every loan's outcome with its features as of the application, computed only when stale."""
        path = self.location(f"version={self.version}", f"training_set_h{int(horizon_months)}.parquet")
        if self._is_current(path):
            log.info("reusing training set %s", path)
            return path
        return self._by_bucket(path, TRAINING_ORDER, "applied_at", "training set", training_part, int(horizon_months),
                               last_observation(self.raw_store))


def month_starts(raw_store: RawStore) -> list[pd.Timestamp]:
    """First instant of every month after the first order, up to the month after the last one."""
    con = raw_store.connect()
    orders = table_readers(raw_store, con, ["orders"])["orders"]
    first, last = fetch_one(con, f"SELECT min(ordered_at), max(ordered_at) FROM {orders}")
    if first is None:
        return []
    return list(pd.date_range(pd.Timestamp(first).to_period("M").to_timestamp() + pd.offsets.MonthBegin(1),
                              pd.Timestamp(last).to_period("M").to_timestamp() + pd.offsets.MonthBegin(1),
                              freq="MS"))


ENTITY_COLUMNS = ["application_id", "loan_id", "merchant_id", "as_of", "product", "defaulted"]
"""Label-table columns the feature-store training run keeps besides the features themselves."""


def complete_rows(path: str, columns: list[str],
                  filesystem: pa_fs.FileSystem | None = None) -> tuple[pd.DataFrame, int]:
    """The rows of a training-set file whose outcome is complete, with `columns`, and the file's row count.

    Read a row group at a time and filtered before pandas sees them: memory is the complete rows and one row
    group, not the whole file (at 100M orders, 2.7M loans of which 1.0M complete, a 0.7 GB frame: the process
    peaked at 4.4 GB reading the file whole and filtering in pandas, at 1.7 GB this way)."""
    file = pq.ParquetFile(path, filesystem=filesystem)
    kept = [table.filter(table.column("outcome_complete")).drop_columns(["outcome_complete"])
            for table in (file.read_row_group(i, columns=[*columns, "outcome_complete"])
                          for i in range(file.num_row_groups))]
    schema = file.schema_arrow
    empty = pa.schema([schema.field(c) for c in columns]).with_metadata(schema.metadata).empty_table()
    table = pa.concat_tables(kept) if kept else empty
    table = table.replace_schema_metadata(schema.metadata)  # pandas metadata: the frame pandas reads whole
    del kept
    return table.to_pandas(self_destruct=True, split_blocks=True), file.metadata.num_rows


def training_frame(settings: Settings, map_parts: PartitionMap = in_turn) -> pd.DataFrame:
    """Completed loan outcomes with point-in-time features as of each application (the offline store's
    training set, reused while the raw snapshot and the feature definitions are unchanged; built, when it is
    stale, a merchant bucket at a time by `map_parts`)."""
    offline = OfflineStore.from_settings(settings, map_parts=map_parts)
    store, horizon = offline.raw_store, settings.model.label_horizon_months
    path = offline.arrow_path(offline.training_set(horizon))
    complete, loans = complete_rows(path, [*ENTITY_COLUMNS, *feature_names()], offline.arrow_fs)
    if complete.empty:
        raise ScfriskError(f"none of the {loans} loans in {store.root} has a complete {horizon}-month "
                           "outcome yet; ingest a longer history")
    return complete
