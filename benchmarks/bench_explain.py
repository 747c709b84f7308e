"""Explanations: exact SHAP for a scored population, and reason-code latency per merchant.

Same ~300-tree booster throughout. Baselines in the same run: `shap.TreeExplainer` for LightGBM's native
`pred_contrib` (what `explanation.contributions` uses), and the on-the-fly reason codes for the precomputed lookup.
`python -m benchmarks.bench_explain [rows]` (default 100,000).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import shap

from benchmarks.common import write_section
from explanation.contributions import explain
from explanation.reason_codes import REFERENCES_KEY, ReasonCodeIndex, explain_payloads, reference_values
from models.calibration import Calibrator
from models.pd_model import PDModel, prepare_features
from models.training import BASE_PARAMS, DEFAULT_CANDIDATE, infer_features
from testkit.explain import NOT_FEATURES, catalogue_applications, explanation_table, write_explanations

log = logging.getLogger("bench_explain")
ROUNDS, TRAIN_ROWS, SEED = 300, 20_000, 42
LOOKUPS, PAYLOADS = 20_000, 300


def _model(frame: pd.DataFrame) -> PDModel:
    """A fixed 300-round booster (no early stopping), so every figure is for the same tree count."""
    features = infer_features(frame, NOT_FEATURES)
    train = frame.head(TRAIN_ROWS)
    inputs, y = prepare_features(train, features), train["defaulted"].to_numpy()
    booster = lgb.train(
        {**BASE_PARAMS, **DEFAULT_CANDIDATE, "seed": SEED}, lgb.Dataset(inputs, y), num_boost_round=ROUNDS
    )
    model = PDModel(booster, features, Calibrator("platt").fit(booster.predict(inputs, raw_score=True), y))
    model.metadata = {REFERENCES_KEY: reference_values(inputs, model.predict_pd(train))}
    return model


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50)), float(np.percentile(seconds, 99))


def main(rows: int = 100_000) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    frame = catalogue_applications(rows, SEED).set_index("merchant_id", drop=False)
    model = _model(frame)
    inputs = model.prepare(frame)
    log.info(
        "model: %d trees, %d features; explaining %d rows",
        model.booster.num_trees(),
        len(model.features),
        rows,
    )

    native_s, explanation = _timed(lambda: explain(model.booster, inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = shap.TreeExplainer(model.booster)
        tree_s, tree_values = _timed(lambda: explainer.shap_values(inputs))
    same = float(np.abs(tree_values - explanation.values.to_numpy()).max())
    additivity = float(
        np.abs(explanation.margin.to_numpy() - model.booster.predict(inputs, raw_score=True)).max()
    )
    log.info("pred_contrib %.1f s, TreeExplainer %.1f s, max |difference| %.2e", native_s, tree_s, same)

    with tempfile.TemporaryDirectory() as tmp:
        keys = frame[["merchant_id", "applied_at"]]
        parquet_s, path = _timed(
            lambda: write_explanations(
                explanation_table(explanation, keys, "bench"), Path(tmp) / "shap.parquet"
            )
        )
        parquet_mb = path.stat().st_size / 1e6
    references = model.metadata[REFERENCES_KEY]
    build_s, index = _timed(
        lambda: ReasonCodeIndex.build(explanation, inputs, references, model_version="bench")
    )

    rng = np.random.default_rng(SEED)
    merchants = frame["merchant_id"].to_numpy()[rng.integers(0, rows, LOOKUPS)]
    lookup = [_timed(lambda m=m: index.lookup(m))[0] for m in merchants]
    payload_rows = [frame.iloc[[i]] for i in rng.integers(0, rows, PAYLOADS)]
    explain_payloads(model, payload_rows[0])  # warm-up
    live = [_timed(lambda p=p: explain_payloads(model, p))[0] for p in payload_rows]
    prepare_one = [_timed(lambda p=p: model.prepare(p))[0] for p in payload_rows]
    shap_one = [
        _timed(lambda p=p: explain(model.booster, model.prepare(p), threads=1))[0] for p in payload_rows
    ]
    (lookup_p50, lookup_p99), (live_p50, live_p99) = _percentiles(lookup), _percentiles(live)
    shap_p50, _ = _percentiles(shap_one)
    prepare_p50, _ = _percentiles(prepare_one)
    load = os.getloadavg()[0]

    body = f"""
Model: LightGBM, {model.booster.num_trees()} trees ({DEFAULT_CANDIDATE["num_leaves"]} leaves), {len(model.features)}
features (numeric and categorical, with missing values), trained once; every figure below uses it. 1-minute
load average at the end of the run: {load:.1f} on {os.cpu_count()} cores (absolute times stretch with the
load; ratios within the run are the comparable figures).

**Exact SHAP for {rows:,} rows** (baseline: `shap.TreeExplainer`)

| method | seconds | ms / row | speed vs baseline |
|---|---:|---:|---:|
| `shap.TreeExplainer(booster).shap_values` (baseline) | {tree_s:.1f} | {1e3 * tree_s / rows:.2f} | 1.00x |
| LightGBM `pred_contrib` via `explanation.contributions.explain` (chosen) | {native_s:.1f} | {1e3 * native_s / rows:.2f} | {tree_s / native_s:.2f}x |

TreeSHAP cost is per row, so 100,000 rows take about {native_s / rows * 1e5:,.0f} s at this rate. Both are exact
TreeSHAP and agree to {same:.1e}; shap delegates LightGBM boosters to `pred_contrib` itself, so the gap
in this run ({tree_s / native_s:.2f}x) is the overhead shap adds around that same call (input conversion and
threading). We call `pred_contrib` directly on a float matrix: one dependency less, and LightGBM's
categorical splits handled natively (shap's own C++ TreeSHAP mis-handles them). Additivity:
max |base + sum(SHAP) - raw margin| = {additivity:.1e}. Audit Parquet of all rows: {parquet_s:.1f} s,
{parquet_mb:.1f} MB.

**Reason codes per merchant** (baseline: on the fly)

| path | p50 | p99 | speed vs baseline (p50) |
|---|---:|---:|---:|
| on the fly, explicit payload: prepare + TreeSHAP + wording (baseline) | {1e3 * live_p50:.2f} ms | {1e3 * live_p99:.2f} ms | 1.00x |
| of which `PDModel.prepare` of one row | {1e3 * prepare_p50:.2f} ms | | |
| of which prepare + TreeSHAP of one row | {1e3 * shap_p50:.2f} ms | | |
| precomputed `ReasonCodeIndex.lookup` | {1e6 * lookup_p50:.1f} µs | {1e6 * lookup_p99:.1f} µs | {live_p50 / lookup_p50:,.0f}x |

Building the index for {rows:,} merchants from the batch SHAP values: {build_s:.1f} s ({LOOKUPS:,} lookups,
{PAYLOADS} payloads timed). The online store is served by the lookup, well under the 2 ms budget; the
on-the-fly path is for merchants outside the store only.
"""
    print(body)
    write_section("Explanations", body)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
