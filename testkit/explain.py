"""A small trained PD model on catalogue feature names, shared by the explanation and report tests.

The synthetic applications (`testkit.synthetic`) (known true PD, categoricals, missing values, sentinels) are
renamed to features of `features/definitions.py`, so reason codes are worded from the real catalogue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from explanation.contributions import Explanation
from explanation.reason_codes import REFERENCES_KEY, reference_values
from models.master_scale import load_master_scale
from models.pd_model import PDModel
from models.splits import time_split
from models.training import infer_features, train_pd_model
from testkit.synthetic import DIRECTIONS, synthetic_applications

log = logging.getLogger(__name__)
SHAP_PREFIX = "shap__"
"""Column prefix of contributions in audit files, so they are never mistaken for feature values."""
REPO = Path(__file__).resolve().parents[1]
RENAME = {
    "merchant_type": "segment",
    "months_on_platform": "tenure_days",
    "gmv_90d_log": "net_sales_90d",
    "late_settlement_share": "late_delivery_rate_90d",
    "rating_avg": "avg_rating_90d",
    "gmv_growth": "sales_growth_90d",
}
NOT_FEATURES = {"application_id", "applied_at", "product", "defaulted", "true_pd", "merchant_id", "slice"}


@dataclass(frozen=True)
class Trained:
    model: PDModel
    frame: pd.DataFrame
    """Every application with its slice, `pd` and `y`; `merchant_id` is unique. Shared: do not mutate."""


def catalogue_applications(n: int, seed: int) -> pd.DataFrame:
    frame = synthetic_applications(n, seed, months=18).rename(columns=RENAME)
    frame["tenure_days"] = frame["tenure_days"] * 30.4
    frame["net_sales_90d"] = np.exp(frame["net_sales_90d"])
    frame["merchant_id"] = [f"M{i:07d}" for i in range(len(frame))]
    return frame


@cache
def train(n: int = 4000, seed: int = 7, max_rounds: int = 120) -> Trained:
    frame = catalogue_applications(n, seed)
    frame["slice"] = time_split(frame["applied_at"], valid_months=3, test_months=4)
    directions = {RENAME.get(k, k): v for k, v in DIRECTIONS.items()}
    features = infer_features(frame, NOT_FEATURES, directions)
    result = train_pd_model(
        frame,
        frame["defaulted"],
        frame["slice"],
        features,
        seed=seed,
        max_rounds=max_rounds,
        search_trials=1,
        master_scale=load_master_scale(REPO / "policy.toml"),
    )
    model = result.model
    frame["pd"] = model.predict_pd(frame)
    frame["y"] = frame["defaulted"]
    train_rows = frame["slice"] == "train"
    model.metadata = {
        REFERENCES_KEY: reference_values(model.prepare(frame[train_rows]), frame.loc[train_rows, "pd"])
    }
    return Trained(model, frame)


def used_features(booster: lgb.Booster) -> list[str]:
    """Features with at least one split: the only ones that can ever receive a contribution."""
    splits = booster.feature_importance(importance_type="split")
    return [name for name, count in zip(booster.feature_name(), splits) if count > 0]


def explanation_table(explanation: Explanation, keys: pd.DataFrame, model_version: str) -> pd.DataFrame:
    """One audit row per scored row: its keys, the model version, base value, margin and each contribution."""
    if len(keys) != len(explanation.values):
        raise ValueError(f"{len(keys)} key rows for {len(explanation.values)} explained rows")
    shap_columns = explanation.values.add_prefix(SHAP_PREFIX).reset_index(drop=True)
    return pd.concat(
        [
            keys.reset_index(drop=True),
            pd.DataFrame(
                {
                    "model_version": model_version,
                    "base_value": explanation.base_value,
                    "raw_margin": explanation.margin.to_numpy(),
                }
            ),
            shap_columns,
        ],
        axis=1,
    )


def write_explanations(table: pd.DataFrame, path: Path | str) -> Path:
    """Write an `explanation_table` to Parquet; float64 is kept so an auditor can re-add the margin exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path, compression="zstd")
    log.info("wrote %d explanations to %s", len(table), path)
    return path
