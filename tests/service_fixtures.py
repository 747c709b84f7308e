"""A small real bundle for the publishing and service tests: a LightGBM PD model trained on synthetic
applications, an online snapshot of merchants, and limits from the real limit engine and policy."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from models.calibration import Calibrator
from models.limits import compute_limits
from models.pd_model import FeatureSpec, PDModel, prepare_features
from models.policy import load_policy
from models.synthetic import synthetic_applications
from pipelines.publish import BundleParts

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policy.toml"
NUMERIC = {"months_on_platform": -1, "gmv_90d_log": -1, "refund_rate_90d": 1, "late_settlement_share": 1,
           "complaints_90d": 1, "rating_avg": -1}
FEATURES = (*(FeatureSpec(name, "numeric", d) for name, d in NUMERIC.items()),
            FeatureSpec("category", "categorical", 0, ("apparel", "electronics", "home", "beauty", "food", "sports",
                                                       "toys", "auto_parts")))


def train_model(seed: int = 7, rounds: int = 40) -> PDModel:
    apps = synthetic_applications(4000, seed)
    X = prepare_features(apps, FEATURES)
    params = {"objective": "binary", "learning_rate": 0.1, "num_leaves": 8, "verbose": -1, "seed": seed,
              "monotone_constraints": [f.direction for f in FEATURES]}
    booster = lgb.train(params, lgb.Dataset(X, label=apps["defaulted"]), num_boost_round=rounds)
    calibrator = Calibrator("platt").fit(booster.predict(X, raw_score=True), apps["defaulted"].to_numpy())
    return PDModel(booster, FEATURES, calibrator, load_policy(POLICY).master_scale, {"seed": seed})


def online_snapshot(n: int = 300, seed: int = 11) -> pd.DataFrame:
    """Latest feature vector per merchant: the model's inputs and the limit engine's."""
    rng = np.random.default_rng(seed)
    apps = synthetic_applications(n, seed)
    sales = np.exp(rng.normal(10.5, 0.8, n))
    return pd.DataFrame({
        "merchant_id": [f"M{i:07d}" for i in range(n)],
        **{name: apps[name] for name in NUMERIC},
        "category": apps["category"],
        "segment": apps["merchant_type"],
        "tenure_days": (apps["months_on_platform"] * 30.4).round(),
        "net_sales_30d": sales / 3,
        "net_sales_90d": sales,
        "unsettled_order_value": sales * rng.uniform(0.05, 0.4, n),
        "open_receivables_current": sales * rng.uniform(0.0, 0.5, n),
        "receivables_top_counterparty_share": rng.uniform(0.1, 0.9, n),
        "inventory_value_in_warehouse": sales * rng.uniform(0.0, 1.0, n),
    })


def reason_table(snapshot: pd.DataFrame) -> pd.DataFrame:
    """Two reason codes for every merchant (stands in for the explainer's precomputed index)."""
    rows = [{"merchant_id": m, "rank": r, "code": code, "description": text}
            for m in snapshot["merchant_id"]
            for r, (code, text) in enumerate([("refund_rate_90d", "High share of refunded orders"),
                                              ("rating_avg", "Low buyer ratings")], start=1)]
    return pd.DataFrame(rows)


def make_parts(workdir: Path, model: PDModel, snapshot: pd.DataFrame, version: str = "1") -> BundleParts:
    """Everything a run hands to `publish`, computed by the real model and limit engine."""
    model_dir = model.save(workdir / f"model-{version}")
    scored = snapshot.assign(pd=model.predict_pd(snapshot))
    report = workdir / f"report-{version}.html"
    report.write_text(f"<html><body><h1>Risk report, model {version}</h1></body></html>")
    return BundleParts(
        model_dir=model_dir,
        model_version=version,
        feature_set_version="fs-1",
        features_as_of="2026-11-01T00:00:00",
        online_features=snapshot,
        limits=compute_limits(scored, load_policy(POLICY)),
        reason_codes=reason_table(snapshot),
        policy_file=POLICY,
        risk_report=report,
    )
