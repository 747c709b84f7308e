"""Batch limits table: every merchant x product as of a time, from champion PDs and point-in-time features.

Thin glue: features come from the offline store's snapshot (what the online store serves), PDs from the
champion in the MLflow registry (`models.registry`), limits from `models.limits`; the result is one
Parquet file under `$SCFRISK_HOME/limits/as_of=<date>/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from prefect import flow

from models.limits import compute_limits
from models.pd_model import PDModel
from models.policy import CreditPolicy, load_policy
from pipelines.config import Settings
from pipelines.errors import ScfriskError
from pipelines.raw_store import RawStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LimitsResult:
    path: Path
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
            f"policy {self.policy_version} -> {self.path}"
        )


def limits_table(
    features: pd.DataFrame, model: PDModel, model_version: str, policy: CreditPolicy
) -> pd.DataFrame:
    """Score PDs with the model and apply the policy: the published limits table (pure)."""
    scored = features.assign(pd=model.predict_pd(features))
    limits = compute_limits(scored, policy)
    limits["model_version"] = model_version
    return limits


def limits_path(settings: Settings, as_of: datetime) -> Path:
    return settings.home_dir / "limits" / f"as_of={as_of:%Y-%m-%dT%H%M%S}" / "limits.parquet"


def champion(settings: Settings) -> tuple[PDModel, str]:
    """The champion PD model and its registry version."""
    from mlflow import MlflowClient

    from models.registry import CHAMPION, load_pd_model

    model = load_pd_model(settings, CHAMPION)
    if model is None:
        raise ScfriskError(
            f"registered model '{settings.mlflow.registered_model}' has no champion; run `scfrisk train` first"
        )
    version = MlflowClient().get_model_version_by_alias(settings.mlflow.registered_model, CHAMPION).version
    return model, str(version)


def build_limits(settings: Settings, as_of: datetime | None = None) -> LimitsResult:
    """Policy, champion and the feature snapshot as of `as_of` in; the limits Parquet file out.

    Features come from the offline store (the same snapshot the online store serves, reused when the
    raw data and definitions are unchanged); `as_of` defaults to the end of the ingested data.
    """
    from features.offline_store import OfflineStore, month_starts

    store = RawStore(settings.path("raw_store"))
    if not store.has_table("merchants"):
        raise ScfriskError(f"raw store {store.root} has no merchants; run `scfrisk ingest` first")
    as_of = as_of or month_starts(store)[-1].to_pydatetime()
    policy = load_policy(settings.policy_file)
    features = OfflineStore(settings.path("feature_store"), store).read(as_of)
    if features.empty:
        raise ScfriskError(f"no merchant was onboarded before {as_of:%Y-%m-%d}; nothing to limit")
    model, version = champion(settings)
    limits = limits_table(features, model, version, policy)
    path = limits_path(settings, as_of)
    path.parent.mkdir(parents=True, exist_ok=True)
    limits.to_parquet(path, index=False)
    return LimitsResult(
        path, as_of, len(limits), len(features), int(limits["eligible"].sum()), version, policy.version
    )


@flow(name="limits")
def limits_flow(settings: Settings, as_of: datetime | None = None) -> LimitsResult:
    """Prefect shell of `build_limits`: one flow run per limits table."""
    result = build_limits(settings, as_of)
    log.info(result.describe())
    return result
