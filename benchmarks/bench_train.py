"""Default-model training: wall time, OOT AUC gap to the simulator's true PD, calibration (ECE), and LightGBM
against the logistic-regression baseline on the same slices.

Two kinds of data, kept apart in the results:
  * platform: the simulator batch `bench_data/orders_10m` (made by `bench_simulate`) ingested into a
    temporary workspace, its training set built by the feature store exactly as `scfrisk train` does
    (labelled loans, point-in-time features), the true PD read from the batch's `oracle/`. ~100k loans.
  * synthetic: `testkit.synthetic` applications (a flat table whose features carry the true PD) at 100k and
    1M rows; the platform simulator at 1M labelled loans would need ten times this batch.
The platform's true PD also depends on each merchant's health over the six months AFTER the application,
which no application-time feature can know; so the platform run also reports a ceiling: the logistic
baseline fitted on the train slice to the simulator's latent health AT the application (plus product),
what a model with perfect application-time information would reach.
Training is the pure `train_pd_model` (what `scfrisk train` runs, with the baseline) without MLflow, with
the workspace's `[model]` settings; only the 1M run tries fewer candidates, to bound the run time.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.bench_simulate import BENCH_DATA, MONTHS, SEED, SIZES
from benchmarks.common import self_peak_mb, write_section
from core.settings import Settings
from features.definitions import FEATURES
from features.offline_store import ENTITY_COLUMNS, training_frame
from models.evaluation import evaluate_model, pd_metrics
from models.pd_model import prepare_features
from models.splits import time_split
from models.training import LogisticBaseline, binary_target, infer_features, train_pd_model
from pipelines.ingest import ingest
from pipelines.train import oracle_pd
from testkit.synthetic import DIRECTIONS, synthetic_applications

DATASET = BENCH_DATA / "orders_10m"
SYNTHETIC_SIZES = ((100_000, None), (1_000_000, 1))
"""(rows, hyper-parameter candidates; None = the workspace's `search_trials`)."""
SYNTHETIC_NOT_FEATURES = {"application_id", "applied_at", "defaulted", "true_pd"}


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """(result, wall s, CPU s of this process): CPU seconds hold on a shared machine, wall time does not."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def train_and_test(settings: Settings, frame: pd.DataFrame, y: pd.Series, slices: pd.Series,
                   exclude: set[str], directions: dict[str, int], kinds: dict[str, str] | None,
                   true_pd: pd.Series, trials: int) -> dict[str, Any]:
    """Time `train_pd_model` on the time split, then the OOT test metrics, baseline's and oracle's."""
    features = infer_features(frame[slices == "train"], exclude, directions, kinds)
    m = settings.model
    result, wall, cpu = timed(lambda: train_pd_model(frame, y, slices, features, seed=settings.seed,
                                                     max_rounds=m.max_rounds, search_trials=trials,
                                                     threads=m.threads))
    baseline_pd = result.baseline.predict_pd(result.model.prepare(frame))
    metrics = evaluate_model(result.model, baseline_pd, frame, y, slices, [], true_pd).metrics
    return {**metrics, "train_s": wall, "train_cpu": cpu, "trials": trials, "features": len(features),
            "rounds": result.params["rounds"], "calibration": result.model.calibrator.method,
            "slices": slices.value_counts().to_dict(), "load": os.getloadavg()[0]}


def application_time_ceiling(settings: Settings, dataset: Path, frame: pd.DataFrame, y: pd.Series,
                             slices: pd.Series) -> float:
    """OOT AUC of the logistic baseline fitted on train to the oracle's latent health at application +
    product: the most any application-time model could get from perfect knowledge of the merchant."""
    health = pd.read_parquet(dataset / "oracle" / "loans", columns=["loan_id", "health_at_application"])
    known = frame[["product"]].assign(health_at_application=frame["loan_id"].map(
        health.set_index("loan_id")["health_at_application"]))
    train, test = (slices == "train").to_numpy(), (slices == "test").to_numpy()
    specs = infer_features(known[train], set())
    X = prepare_features(known, specs)
    model = LogisticBaseline(specs, settings.seed).fit(X[train], y.to_numpy()[train])
    return pd_metrics(y.to_numpy()[test], model.predict_pd(X[test]))["auc"]


def platform(settings: Settings, dataset: Path) -> dict[str, Any]:
    """Ingest the simulator batch, build the feature store's training set, train and test on it."""
    _, ingest_s, ingest_cpu = timed(ingest, dataset, settings)
    ingest_load = os.getloadavg()[0]
    frame, features_s, features_cpu = timed(training_frame, settings)
    true_pd = oracle_pd(dataset, frame["loan_id"])
    y = binary_target(frame["defaulted"])
    slices = time_split(frame["as_of"], settings.model.valid_months, settings.model.test_months)
    result = train_and_test(settings, frame, y, slices, set(ENTITY_COLUMNS),
                            {f.name: f.direction for f in FEATURES}, {f.name: f.kind for f in FEATURES},
                            true_pd, settings.model.search_trials)
    return {**result, "rows": len(frame), "ingest_s": ingest_s, "ingest_cpu": ingest_cpu,
            "ingest_load": ingest_load, "features_s": features_s, "features_cpu": features_cpu,
            "oracle_known": int(true_pd.notna().sum()),
            "ceiling_auc": application_time_ceiling(settings, dataset, frame, y, slices)}


def synthetic(settings: Settings, rows: int, trials: int | None) -> dict[str, Any]:
    frame = synthetic_applications(rows, settings.seed)
    slices = time_split(frame["applied_at"], valid_months=4, test_months=4)
    result = train_and_test(settings, frame, frame["defaulted"], slices, SYNTHETIC_NOT_FEATURES, DIRECTIONS,
                            None, frame["true_pd"], trials or settings.model.search_trials)
    return {**result, "rows": rows}


def row(data: str, r: dict[str, Any]) -> str:
    s = r["slices"]
    return (f"| {data} | {r['rows']:,} | {s['train']:,} / {s['valid']:,} / {s['test']:,} | {r['trials']} "
            f"| {r['train_s']:.1f} | {r['train_cpu']:.1f} | {r['test_auc']:.4f} | {r['oracle_auc']:.4f} "
            f"| {r['auc_gap_to_oracle']:+.4f} | {r['test_ece']:.4f} | {r['oracle_ece']:.4f} "
            f"| {r['test_brier']:.4f} | {r['oracle_brier']:.4f} | {r['baseline_auc']:.4f} "
            f"| {r['test_auc'] - r['baseline_auc']:+.4f} | {r['calibration']} | {r['load']:.1f} |")


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp))
        results = [("platform", platform(settings, DATASET))]
        results += [("synthetic", synthetic(settings, rows, trials)) for rows, trials in SYNTHETIC_SIZES]
    total_s = time.perf_counter() - start
    p, m = results[0][1], settings.model
    gap, ece = p["auc_gap_to_oracle"], p["test_ece"]
    lines = [
        "| data | labelled rows | train / valid / test | candidates | train wall s | train CPU s | OOT AUC "
        "| oracle AUC | gap (goal <= 0.01) | ECE (goal < 0.01) | oracle ECE | Brier | oracle Brier "
        "| baseline AUC | AUC vs baseline | calibration | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *(row(data, r) for data, r in results),
    ]
    body = "\n".join([
        f"`python -m benchmarks.bench_train` ({total_s / 60:.1f} min in all, peak RSS {self_peak_mb():,.0f} "
        "MB): the pure training (`train_pd_model`, as `scfrisk train` runs it, with the logistic baseline; "
        f"no MLflow) with the workspace's `[model]` settings ({m.threads} LightGBM "
        f"thread, at most {m.max_rounds} rounds), then the out-of-time test. Oracle = the simulator's true "
        "PD on the same test rows; baseline = logistic regression on the same slices. Load = 1-minute load "
        "average of the 2-core machine at the end of each training (wall times stretch with it; CPU "
        "seconds do not).",
        "",
        f"* **platform**: `bench_data/{DATASET.name}` (`scfrisk simulate --merchants {SIZES[DATASET.name]} "
        f"--months {MONTHS} --seed {SEED}`) ingested into a new workspace, training set from the feature "
        f"store as `scfrisk train` builds it (loans with a complete {m.label_horizon_months}-month outcome, "
        f"point-in-time features), time split {m.valid_months} validation + {m.test_months} test months; "
        f"true PD from the batch's `oracle/` ({p['oracle_known']:,} of {p['rows']:,} loans). "
        f"{p['features']} features. Stages: ingest {p['ingest_s']:.0f} s wall / {p['ingest_cpu']:.0f} s CPU "
        f"(load {p['ingest_load']:.1f}), feature-store training set {p['features_s']:.0f} s / "
        f"{p['features_cpu']:.0f} s CPU, training {p['train_s']:.0f} s / {p['train_cpu']:.0f} s CPU "
        f"({p['rounds']} rounds).",
        "* **synthetic**: `testkit.synthetic` applications (24 months; last 4 test, 4 before validate), a "
        "flat table whose features carry the true PD; the 1M row tries a single candidate to bound the run "
        f"time. 1M labelled platform loans would take a batch {1_000_000 / p['rows']:.0f}x this one "
        f"(~{SIZES[DATASET.name] * 1_000_000 / p['rows'] / 1000:,.0f}k merchants), beyond a 10-minute, 8 GB "
        "benchmark.",
        "",
        *lines,
        "",
        f"**Goals at ~100k platform rows:** AUC gap to the true PD {gap:.4f} (goal <= 0.01: "
        f"{'met' if gap <= 0.01 else '**NOT met**'}); ECE {ece:.4f} (goal < 0.01: "
        f"{'met' if ece < 0.01 else '**NOT met**'}). The true PD uses the merchant's health over the six "
        "months after the application (where shocks hit), which no application-time model can see: the "
        "logistic baseline on the simulator's exact latent health at the application plus product reaches "
        f"{p['ceiling_auc']:.4f} OOT AUC, already {p['oracle_auc'] - p['ceiling_auc']:.4f} below the oracle. "
        f"The remaining {p['ceiling_auc'] - p['test_auc']:.4f} is the features' noisy view of that health. "
        "On the synthetic rows, whose features carry the whole true PD, the same training is within "
        f"{results[1][1]['auc_gap_to_oracle']:.4f} / {results[2][1]['auc_gap_to_oracle']:.4f} of the oracle, "
        "so the gap comes from the information in the features, not from the training. Nothing here is "
        "tuned on the test months. "
        + (f"In this run even the application-time ceiling is {p['oracle_auc'] - p['ceiling_auc']:.4f} below "
           "the oracle, more than the 0.01 goal: the goal would be fair against an oracle of what is knowable "
           "at the application (E[true PD | health at application])."
           if p["oracle_auc"] - p["ceiling_auc"] > 0.01 else
           "In this run the application-time ceiling is within 0.01 of the oracle."),
    ])
    print(body)
    write_section("Default models", body)


if __name__ == "__main__":
    main()
