"""A small real bundle for the publishing and service tests: a LightGBM PD model trained on synthetic
applications named after catalogue features (so reason codes are worded from `features/definitions.py`),
an online snapshot of merchants, limits from the real limit engine and policy, and the batch reason-code
index of the real explainer."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import lightgbm as lgb
import numpy as np
import pandas as pd
import uvicorn

from core.files import file_sha256
from core.settings import Settings
from credit.limits import compute_limits
from credit.policy import load_policy
from explanation.reason_codes import REFERENCES_KEY, ReasonCodeIndex, reference_values
from features.definitions import feature_set_version
from models.calibration import Calibrator
from models.pd_model import FeatureSpec, PDModel, prepare_features
from pipelines.publish import BundleParts
from serving.bundle import LIMITS_FILE, MANIFEST
from testkit.explain import catalogue_applications

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policy.toml"
NUMERIC = {"tenure_days": -1, "net_sales_90d": -1, "refund_rate_90d": 1, "late_delivery_rate_90d": 1,
           "complaints_90d": 1, "avg_rating_90d": -1}
FEATURES = (*(FeatureSpec(name, "numeric", d) for name, d in NUMERIC.items()),
            FeatureSpec("category", "categorical", 0, ("apparel", "electronics", "home", "beauty", "food", "sports",
                                                       "toys", "auto_parts")))


def train_model(seed: int = 7, rounds: int = 40) -> PDModel:
    apps = catalogue_applications(4000, seed)
    X = prepare_features(apps, FEATURES)
    params = {"objective": "binary", "learning_rate": 0.1, "num_leaves": 8, "verbose": -1, "seed": seed,
              "monotone_constraints": [f.direction for f in FEATURES]}
    booster = lgb.train(params, lgb.Dataset(X, label=apps["defaulted"]), num_boost_round=rounds)
    margin = booster.predict(X, raw_score=True)
    calibrator = Calibrator("platt").fit(margin, apps["defaulted"].to_numpy())
    references = reference_values(X, calibrator.transform(margin))
    return PDModel(booster, FEATURES, calibrator, load_policy(POLICY).master_scale,
                   {"seed": seed, REFERENCES_KEY: references})


def register_champion(settings: Settings, seed: int = 7) -> str:
    """`train_model` logged to the workspace's MLflow registry as its champion (real MLflow); its version."""
    import mlflow

    from models.registry import CHAMPION, configure_mlflow, log_pd_model

    client = configure_mlflow(settings)
    with mlflow.start_run():
        version = log_pd_model(train_model(seed), online_snapshot(20), settings.mlflow.registered_model)
    client.set_registered_model_alias(settings.mlflow.registered_model, CHAMPION, version)
    return version


def online_snapshot(n: int = 300, seed: int = 11) -> pd.DataFrame:
    """Latest feature vector per merchant: the model's inputs and the limit engine's."""
    rng = np.random.default_rng(seed)
    apps = catalogue_applications(n, seed)
    sales = apps["net_sales_90d"]
    return pd.DataFrame({
        "merchant_id": apps["merchant_id"],
        **{name: apps[name] for name in NUMERIC},
        "tenure_days": apps["tenure_days"].round(),
        "category": apps["category"],
        "segment": apps["segment"],
        "net_sales_30d": sales / 3,
        "unsettled_order_value": sales * rng.uniform(0.05, 0.4, n),
        "open_receivables_current": sales * rng.uniform(0.0, 0.5, n),
        "receivables_top_counterparty_share": rng.uniform(0.1, 0.9, n),
        "inventory_value_in_warehouse": sales * rng.uniform(0.0, 1.0, n),
    })


def make_parts(workdir: Path, model: PDModel, snapshot: pd.DataFrame, version: str = "1") -> BundleParts:
    """Everything a run hands to `publish`, computed by the real model and limit engine."""
    model_dir = model.save(workdir / f"model-{version}")
    scored = snapshot.assign(pd=model.predict_pd(snapshot))
    report = workdir / f"report-{version}.html"
    report.write_text(f"<html><body><h1>Risk report, model {version}</h1></body></html>")
    return BundleParts(
        model_dir=model_dir,
        model_version=version,
        feature_set_version=feature_set_version(),  # the model reads catalogue features: records can be scored
        features_as_of="2026-11-01T00:00:00",
        online_features=snapshot,
        limits=compute_limits(scored, load_policy(POLICY)),
        reason_codes=ReasonCodeIndex.for_population(model, snapshot, version),
        policy_file=POLICY,
        risk_report=report,
    )


def tamper_limits(bundle_dir: Path, change) -> None:  # noqa: ANN001 - change: DataFrame -> None
    """Change a bundle's limit table in place and write its new hash into the manifest, as anyone who can
    write the published folder could."""
    path = bundle_dir / LIMITS_FILE
    limits = pd.read_parquet(path)
    change(limits)
    limits.to_parquet(path, index=False)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"][LIMITS_FILE] = file_sha256(path)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


def drop_last_merchants_limit(limits: pd.DataFrame) -> None:
    """The limit of the table's last merchant becomes null: its decisions would raise a TypeError."""
    limits.loc[limits["merchant_id"] == limits["merchant_id"].iloc[-1], "limit"] = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_service(app: Any, key: str, timeout: float = 20.0, until: str = "/readyz") -> Iterator[httpx.Client]:
    """The app under a real uvicorn server on a free loopback port, until `until` answers 200 (`/healthz`
    for a service that is up with no bundle live); yields a client with `key` in X-API-Key (its `base_url`
    is the service's URL)."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get(until).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the service on port {port} was not ready within {timeout} s")
        time.sleep(0.05)
    try:
        yield client
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
