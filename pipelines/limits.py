"""Batch limits table: every merchant x product as of a time, from champion PDs and point-in-time features.

Thin glue: features come from the offline store's snapshot (what the online store serves), PDs from the
champion in the MLflow registry (`models.registry`), limits from `credit.limits`; the result is one
Parquet file under `$SCFRISK_HOME/limits/as_of=<date>/`, merged from the part files of the tasks that
computed it, and strategy reports built from the tasks' sums (`credit.strategy.StrategySums`): the flow's
memory does not grow with the book.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from prefect import flow

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import Settings
from credit.limits import compute_limits
from credit.policy import CreditPolicy, load_policy
from credit.strategy import StrategySums, backtest_limits, merge_sums, strategy_sums, tables_of
from features.definitions import feature_names, feature_set_version
from features.offline_store import (
    ENTITY_COLUMNS,
    PART_ROWS,
    WRITE_ROWS,
    OfflineStore,
    in_turn,
    month_starts,
    read_rows,
    write_merged,
)
from models.pd_model import PDModel
from models.registry import CHAMPION, RegisteredPD, load_registered
from models.splits import time_split
from pipelines.compute import run_partitions
from reporting.strategy_report import write_strategy_report

if TYPE_CHECKING:
    from features.offline_store import PartitionMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LimitsResult:
    path: Path
    strategy: Path
    backtest: Path
    as_of: datetime
    rows: int
    merchants: int
    eligible_rows: int
    model_version: str
    policy_version: str

    def describe(self) -> str:
        return (
            f"limits as of {self.as_of:%Y-%m-%d %H:%M}: {self.rows:,} merchant-product rows "
            f"({self.merchants:,} merchants, {self.eligible_rows:,} eligible), model {self.model_version}, "
            f"policy {self.policy_version} -> {self.path}\n  strategy report: {self.strategy}\n  "
            f"out-of-time backtest: {self.backtest}"
        )


def limits_table(
    features: pd.DataFrame, model: PDModel, model_version: str, policy: CreditPolicy
) -> pd.DataFrame:
    """Score PDs with the model and apply the policy: the published limits table (pure)."""
    scored = features.assign(pd=model.predict_pd(features))
    limits = compute_limits(scored, policy)
    limits["model_version"] = model_version
    return limits


def merchant_parts(frame: pd.DataFrame, buckets: int) -> list[pd.DataFrame]:
    """The rows of each merchant bucket (`core.partitioning`, the raw store's), in the frame's order; empty
    buckets left out. Scores, limits and reason codes are row by row, so parts give the whole's rows."""
    import pyarrow as pa

    from core.partitioning import merchant_bucket

    bucket = merchant_bucket(pa.array(frame["merchant_id"].astype(str)), buckets).to_numpy()
    return [frame[bucket == b] for b in range(buckets) if (bucket == b).any()]


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of at least `parts` (and at most `WRITE_ROWS` rows each) slices covering `rows` rows; none
    empty. Scores and limits are row by row, so any slicing of the snapshot gives the whole's rows: slices of
    the file (not merchant buckets, which hash across it) let each task read only its own rows."""
    count = min(rows, max(parts, -(-rows // WRITE_ROWS)))
    edges = np.linspace(0, rows, count + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclass(frozen=True)
class LimitsPart:
    """What a task sends back for its slice of the snapshot: where its limits rows are, and their sums."""

    path: str
    merchants: int
    sums: StrategySums


def limits_part(snapshot: str, filesystem: pa_fs.FileSystem, model: PDModel, model_version: str,
                policy: CreditPolicy, parts_dir: str, rows: tuple[int, int]) -> LimitsPart:
    """`limits_table` of rows [start, stop) of the snapshot, written to a part file beside it (on the feature
    store, which every worker reads) where it is computed (a Dask worker: only the path and the sums go back
    to the flow)."""
    limits = limits_table(read_rows(snapshot, *rows, filesystem), model, model_version, policy)
    path = f"{parts_dir}/rows={rows[0]:012d}.parquet"
    pq.write_table(pa.Table.from_pandas(limits, preserve_index=False), path, row_group_size=PART_ROWS,
                   filesystem=filesystem)
    return LimitsPart(path, rows[1] - rows[0], strategy_sums(limits))


def product_major(merchants: list[int], products: int) -> Iterator[np.ndarray]:
    """The part of every row of the limits file, `WRITE_ROWS` rows at a time: product after product, each
    part's rows of that product in turn (a part holds its merchants product after product)."""
    runs = [(part, n) for _ in range(products) for part, n in enumerate(merchants)]
    chunk: list[np.ndarray] = []
    filled = 0
    for part, n in runs:
        while n:
            take = min(n, WRITE_ROWS - filled)
            chunk.append(np.full(take, part, dtype=np.int32))
            filled, n = filled + take, n - take
            if filled == WRITE_ROWS:
                yield np.concatenate(chunk)
                chunk, filled = [], 0
    if chunk:
        yield np.concatenate(chunk)


def partitioned_limits(snapshot: str, filesystem: pa_fs.FileSystem, model: PDModel, model_version: str,
                       policy: CreditPolicy, parts: int, path: Path, map_parts: PartitionMap) -> StrategySums:
    """The limits of every merchant of the snapshot file, computed per slice of it (run by `map_parts`), merged
    into `path` (on this machine's disk) in the whole's order (products in policy order, merchants in the
    snapshot's) holding `WRITE_ROWS` rows at a time; the strategy sums of the whole, merged from the slices'."""
    rows = pq.ParquetFile(snapshot, filesystem=filesystem).metadata.num_rows
    folder, name = snapshot.rsplit("/", 1)
    parts_dir = f"{folder}/.{name.removesuffix('.parquet')}.limits.parts"
    filesystem.delete_dir_contents(parts_dir, missing_dir_ok=True)  # left by a run that stopped
    filesystem.create_dir(parts_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        score = partial(limits_part, snapshot, filesystem, model, model_version, policy, parts_dir)
        done = map_parts(score, row_ranges(rows, parts), "limits")
        write_merged([part.path for part in done], product_major([part.merchants for part in done],
                                                                  len(policy.products)), str(path), {}, filesystem,
                     pa_fs.LocalFileSystem())
        return merge_sums([part.sums for part in done])
    finally:
        filesystem.delete_dir_contents(parts_dir, missing_dir_ok=True)
        if filesystem.get_file_info(parts_dir).type != pa_fs.FileType.NotFound:
            filesystem.delete_dir(parts_dir)


def limits_path(settings: Settings, as_of: datetime) -> Path:
    return settings.home_dir / "limits" / f"as_of={as_of:%Y-%m-%dT%H%M%S}" / "limits.parquet"


def backtest_part(training: str, filesystem: pa_fs.FileSystem, model: PDModel, policy: CreditPolicy,
                  rows: tuple[int, np.ndarray]) -> StrategySums:
    """The strategy sums of the out-of-time test applications among the training set's rows `rows` (start,
    and the positions of the test rows), scored now: one slice of the backtest, computed where it runs."""
    start, positions = rows
    frame = read_rows(training, start, start + int(positions[-1]) + 1, filesystem)
    test = frame.take(positions)[[*ENTITY_COLUMNS, *feature_names()]].reset_index(drop=True)
    return strategy_sums(backtest_limits(test.assign(pd=model.predict_pd(test)), policy))


def backtest_sums(settings: Settings, model: PDModel, policy: CreditPolicy, parts: int,
                  map_parts: PartitionMap) -> StrategySums:
    """The strategy sums of the out-of-time test applications of the training set (same windows as
    training), scored now, per slice of the test rows (run by `map_parts`); the flow reads the split's
    columns only."""
    offline = OfflineStore.from_settings(settings)
    location = offline.training_set(settings.model.label_horizon_months)
    training = offline.arrow_path(location)
    keys = offline.read_file(training, ["as_of", "outcome_complete"])
    complete = np.flatnonzero(keys["outcome_complete"].to_numpy())
    if not len(complete):
        raise ScfriskError(f"none of the {len(keys)} loans in {offline.raw_store.root} has a complete "
                           f"{settings.model.label_horizon_months}-month outcome yet; ingest a longer history")
    split = time_split(keys["as_of"].iloc[complete].reset_index(drop=True), settings.model.valid_months,
                       settings.model.test_months)
    test = complete[(split == "test").to_numpy()]
    del keys, complete, split
    slices = [(int(test[a]), test[a:b] - test[a]) for a, b in row_ranges(len(test), parts)]
    score = partial(backtest_part, training, offline.arrow_fs, model, policy)
    return merge_sums(map_parts(score, slices, "backtest"))


def write_strategy(settings: Settings, book: StrategySums, backtest: StrategySums, policy: CreditPolicy,
                   run_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Strategy report of the current book (expected) and of the out-of-time backtest (realised), both
    also logged to the champion's MLflow run `run_id`."""
    book_page = write_strategy_report(tables_of(book), out_dir / "strategy", policy.version, run_id,
                                      settings.tracking_uri)
    realised = write_strategy_report(tables_of(backtest), out_dir / "backtest", policy.version, run_id,
                                     settings.tracking_uri)
    return book_page, realised


def champion(settings: Settings) -> RegisteredPD:
    """The champion PD model with its registry version and run, refused unless the feature store has every
    input it reads (a model of another table promoted by hand, or one of retired feature definitions)."""
    name = settings.mlflow.registered_model
    found = load_registered(settings, CHAMPION)
    if found is None:
        raise ScfriskError(f"registered model '{name}' has no champion; run `scfrisk train` first")
    available = set(feature_names())
    missing = [f for f in found.model.feature_names if f not in available]
    if missing:
        raise ScfriskError(
            f"champion {name} v{found.version} (trained on {found.model.metadata.get('source', '?')}) reads "
            f"{len(missing)} input(s) that feature set {feature_set_version()} does not have: {', '.join(missing)}; "
            f"nothing was scored or published: make a model of the feature store champion "
            f"(`scfrisk promote --version N --reason ...`) or train one (`scfrisk train`)"
        )
    return found


def build_limits(settings: Settings, as_of: datetime | None = None,
                 map_parts: PartitionMap | None = None, found: RegisteredPD | None = None) -> LimitsResult:
    """Policy, champion and the feature snapshot as of `as_of` in; the limits Parquet file out.

    Features come from the offline store (the same snapshot the online store serves, reused when the
    raw data and definitions are unchanged); `as_of` defaults to the end of the ingested data. Scores, limits
    and the backtest are computed per slice of their file by `map_parts` (default: one after the other here),
    each slice's limits written to a part file and its strategy sums sent back; the flow merges the parts
    (`WRITE_ROWS` rows at a time) and the sums, never the book. `found`: the champion the caller already read
    (`scfrisk run`: one read of the alias, so its limits and its bundle are of one version), else read here.
    """
    map_parts = map_parts or in_turn
    store = RawStore.from_settings(settings)
    if not store.has_table("merchants"):
        raise ScfriskError(f"raw store {store.root} has no merchants; run `scfrisk ingest` first")
    as_of = as_of or month_starts(store)[-1].to_pydatetime()
    policy = load_policy(settings.policy_file)
    offline = OfflineStore.from_settings(settings, store, map_parts)
    snapshot = offline.arrow_path(offline.materialize(as_of))
    merchants = pq.ParquetFile(snapshot, filesystem=offline.arrow_fs).metadata.num_rows
    if not merchants:
        raise ScfriskError(f"no merchant was onboarded before {as_of:%Y-%m-%d}; nothing to limit")
    model = found or champion(settings)
    path = limits_path(settings, as_of)
    book = partitioned_limits(snapshot, offline.arrow_fs, model.model, model.version, policy, store.buckets, path,
                              map_parts)
    strategy, backtest = write_strategy(settings, book, backtest_sums(settings, model.model, policy, store.buckets,
                                                                      map_parts), policy, model.run_id, path.parent)
    products = book.by_product
    return LimitsResult(
        path, strategy, backtest, as_of, int(products["count"].sum()), merchants,
        int(products["eligible"].sum()), model.version, policy.version,
    )


@flow(name="limits")
def limits_flow(settings: Settings, as_of: datetime | None = None,
                champion: RegisteredPD | None = None) -> LimitsResult:
    """Prefect shell of `build_limits`: one flow run per limits table."""
    result = build_limits(settings, as_of, run_partitions, champion)
    log.info(result.describe())
    return result
