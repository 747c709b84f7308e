"""Default-model training: wall time at 100k and 1M applications, OOT AUC gap to the simulator's true PD,
calibration (ECE), and LightGBM against the logistic-regression baseline on the same slices.

Runs the pure training (search, early stopping, calibration, baseline) without MLflow, on the models
package's synthetic applications, whose true PD is known.
"""

from __future__ import annotations

import time

from benchmarks.common import write_section
from models.evaluation import pd_metrics
from models.splits import time_split
from models.synthetic import DIRECTIONS, synthetic_applications
from models.training import infer_features, train_pd_model

SIZES = ((100_000, 4), (1_000_000, 1))
"""(rows, hyper-parameter candidates): the full search at 100k; one candidate at 1M bounds the run time."""
SEED = 42
NOT_FEATURES = {"application_id", "applied_at", "defaulted", "true_pd"}


def measure(rows: int, trials: int) -> dict[str, float]:
    frame = synthetic_applications(rows, SEED)
    slices = time_split(frame["applied_at"], valid_months=4, test_months=4)
    features = infer_features(frame[slices == "train"], NOT_FEATURES, DIRECTIONS)
    start = time.perf_counter()
    result = train_pd_model(frame, frame["defaulted"], slices, features, seed=SEED, max_rounds=2000,
                            search_trials=trials, threads=2)
    wall = time.perf_counter() - start
    test = frame[slices == "test"]
    y = test["defaulted"].to_numpy()
    model = pd_metrics(y, result.model.predict_pd(test))
    baseline = pd_metrics(y, result.baseline.predict_pd(result.model.prepare(test)))
    oracle = pd_metrics(y, test["true_pd"].to_numpy())
    return {"rows": rows, "trials": trials, "wall_s": wall, "test_rows": len(test), "auc": model["auc"],
            "oracle_auc": oracle["auc"], "gap": oracle["auc"] - model["auc"], "ece": model["ece"],
            "oracle_ece": oracle["ece"], "brier": model["brier"], "oracle_brier": oracle["brier"],
            "baseline_auc": baseline["auc"], "baseline_ece": baseline["ece"], "calibration": result.model.calibrator.method}


def main() -> None:
    results = [measure(rows, trials) for rows, trials in SIZES]
    lines = ["| rows | candidates | train wall s | OOT AUC | oracle AUC | gap (goal <= 0.01) | ECE (goal < 0.01) "
             "| oracle ECE | Brier / oracle | baseline AUC | AUC vs baseline | calibration |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['trials']} | {r['wall_s']:.1f} | {r['auc']:.4f} | {r['oracle_auc']:.4f} "
                     f"| {r['gap']:+.4f} | {r['ece']:.4f} | {r['oracle_ece']:.4f} | {r['brier'] / r['oracle_brier']:.3f} "
                     f"| {r['baseline_auc']:.4f} | {r['auc'] - r['baseline_auc']:+.4f} | {r['calibration']} |")
    body = ("`python -m benchmarks.bench_train`: search + early stopping + calibration + logistic baseline on "
            "`models.synthetic` applications (24 months; last 4 test, 4 before validate), LightGBM 2 threads. "
            "Baseline = logistic regression on the same slices; oracle = the simulator's true PD on the same "
            "test rows.\n\n" + "\n".join(lines))
    print(body)
    write_section("Default models", body)


if __name__ == "__main__":
    main()
