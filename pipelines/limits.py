"""Batch limits table: every merchant x product as of a time, from champion PDs and point-in-time features.

Thin glue: features come from the offline store's snapshot (what the online store serves), PDs from the
champion in the MLflow registry (`models.registry`), limits from `credit.limits`; the result is one
Parquet file under `$SCFRISK_HOME/limits/as_of=<date>/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from prefect import flow

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import Settings
from credit.limits import compute_limits
from credit.policy import CreditPolicy, load_policy
from credit.strategy import backtest_limits, strategy_tables
from features.definitions import feature_names, feature_set_version
from features.offline_store import OfflineStore, in_turn, month_starts, training_frame
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


def partitioned_limits(features: pd.DataFrame, model: PDModel, model_version: str, policy: CreditPolicy,
                       buckets: int, map_parts: PartitionMap) -> pd.DataFrame:
    """`limits_table` of every merchant bucket (run by `map_parts`), put back in the whole's order: products
    in policy order, merchants in the order of `features`."""
    score = partial(limits_table, model=model, model_version=model_version, policy=policy)
    limits = pd.concat(map_parts(score, merchant_parts(features, buckets), "limits"), ignore_index=True)
    position = pd.Series(np.arange(len(features)), index=features["merchant_id"].to_numpy())
    order = np.lexsort((position.loc[limits["merchant_id"].to_numpy()].to_numpy(), limits["product"].cat.codes))
    return limits.take(order).reset_index(drop=True)


def limits_path(settings: Settings, as_of: datetime) -> Path:
    return settings.home_dir / "limits" / f"as_of={as_of:%Y-%m-%dT%H%M%S}" / "limits.parquet"


def backtest_population(settings: Settings, model: PDModel) -> pd.DataFrame:
    """The out-of-time test applications of the training set (same windows as training), scored now."""
    frame = training_frame(settings)
    test = frame[(time_split(frame["as_of"], settings.model.valid_months, settings.model.test_months)
                  == "test").to_numpy()]
    return test.assign(pd=model.predict_pd(test))


def write_strategy(settings: Settings, limits: pd.DataFrame, backtest: pd.DataFrame, policy: CreditPolicy,
                   run_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Strategy report of the current book (expected) and of the out-of-time backtest (realised), both
    also logged to the champion's MLflow run `run_id`."""
    book = write_strategy_report(strategy_tables(limits), out_dir / "strategy", policy.version, run_id,
                                 settings.tracking_uri)
    realised = write_strategy_report(strategy_tables(backtest_limits(backtest, policy)), out_dir / "backtest",
                                     policy.version, run_id, settings.tracking_uri)
    return book, realised


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
                 map_parts: PartitionMap | None = None) -> LimitsResult:
    """Policy, champion and the feature snapshot as of `as_of` in; the limits Parquet file out.

    Features come from the offline store (the same snapshot the online store serves, reused when the
    raw data and definitions are unchanged); `as_of` defaults to the end of the ingested data. Scores and
    limits are computed per merchant bucket by `map_parts` (default: one after the other here); the strategy
    tables from the whole table.
    """
    map_parts = map_parts or in_turn
    store = RawStore.from_settings(settings)
    if not store.has_table("merchants"):
        raise ScfriskError(f"raw store {store.root} has no merchants; run `scfrisk ingest` first")
    as_of = as_of or month_starts(store)[-1].to_pydatetime()
    policy = load_policy(settings.policy_file)
    features = OfflineStore.from_settings(settings, store, map_parts).read(as_of)
    if features.empty:
        raise ScfriskError(f"no merchant was onboarded before {as_of:%Y-%m-%d}; nothing to limit")
    model = champion(settings)
    limits = partitioned_limits(features, model.model, model.version, policy, store.buckets, map_parts)
    path = limits_path(settings, as_of)
    path.parent.mkdir(parents=True, exist_ok=True)
    limits.to_parquet(path, index=False)
    strategy, backtest = write_strategy(settings, limits, backtest_population(settings, model.model), policy,
                                        model.run_id, path.parent)
    return LimitsResult(
        path, strategy, backtest, as_of, len(limits), len(features), int(limits["eligible"].sum()),
        model.version, policy.version,
    )


@flow(name="limits")
def limits_flow(settings: Settings, as_of: datetime | None = None) -> LimitsResult:
    """Prefect shell of `build_limits`: one flow run per limits table."""
    result = build_limits(settings, as_of, run_partitions)
    log.info(result.describe())
    return result
