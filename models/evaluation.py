"""How good a PD is: discrimination (AUC, Gini, KS), calibration (Brier, log loss, ECE), stability (PSI).

Pure functions on arrays and frames, so the same numbers serve training, gates, monitoring and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve

from models.master_scale import MasterScale
from models.pd_model import PDModel

GROUP_COLUMNS = ("segment", "merchant_type", "product")
"""Columns that metrics, grades and explanations are broken down by, when a table has them."""
ECE_BINS = 10
PSI_BINS = 10


def ks_statistic(y: np.ndarray, score: np.ndarray) -> float:
    """Largest gap between the score distributions of defaulters and non-defaulters."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.max(tpr - fpr))


def expected_calibration_error(y: np.ndarray, pd_values: np.ndarray, bins: int = ECE_BINS) -> float:
    """Row-weighted |mean PD - default rate| over equal-count PD bins (equal-width bins would put almost
    every loan of a low-default book into the first bin and hide mis-calibration)."""
    order = np.argsort(pd_values, kind="stable")
    gaps = [abs(pd_values[idx].mean() - y[idx].mean()) * len(idx) for idx in np.array_split(order, bins) if len(idx)]
    return float(np.sum(gaps) / len(y))


def population_stability_index(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS) -> float:
    """PSI of `actual` against `expected`, on the expected distribution's deciles (< 0.10 stable, > 0.25 shifted)."""
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(expected)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(actual)
    e, a = np.clip(e, 1e-6, None), np.clip(a, 1e-6, None)
    return float(np.sum((a - e) * np.log(a / e)))


def pd_metrics(y: np.ndarray, pd_values: np.ndarray) -> dict[str, float]:
    """All single-number metrics of one PD vector; discrimination ones are NaN when only one class is present."""
    y, pd_values = np.asarray(y, int), np.asarray(pd_values, float)
    both = 0 < y.sum() < len(y)
    auc = float(roc_auc_score(y, pd_values)) if both else float("nan")
    return {
        "n": int(len(y)),
        "default_rate": float(y.mean()) if len(y) else float("nan"),
        "mean_pd": float(pd_values.mean()) if len(y) else float("nan"),
        "auc": auc,
        "gini": 2 * auc - 1,
        "ks": ks_statistic(y, pd_values) if both else float("nan"),
        "brier": float(brier_score_loss(y, pd_values)),
        "log_loss": float(log_loss(y, pd_values, labels=[0, 1])),
        "ece": expected_calibration_error(y, pd_values),
    }


def metrics_by(frame: pd.DataFrame, group_cols: list[str], y_col: str = "y", pd_col: str = "pd") -> pd.DataFrame:
    """`pd_metrics` for each value of each grouping column (segment, product), one row per group."""
    rows = []
    for col in group_cols:
        for value, part in frame.groupby(col, observed=True, dropna=False):
            rows.append({"by": col, "value": str(value), **pd_metrics(part[y_col].to_numpy(), part[pd_col].to_numpy())})
    return pd.DataFrame(rows)


def grades_by(frame: pd.DataFrame, scale: MasterScale, group_cols: list[str],
              y_col: str = "y", pd_col: str = "pd") -> pd.DataFrame:
    """Count, mean PD and bad rate per grade, overall and per segment/product value."""
    parts = [scale.grade_table(frame[pd_col].to_numpy(), frame[y_col].to_numpy()).assign(by="all", value="all")]
    for col in group_cols:
        for value, part in frame.groupby(col, observed=True, dropna=False):
            table = scale.grade_table(part[pd_col].to_numpy(), part[y_col].to_numpy())
            parts.append(table.assign(by=col, value=str(value)))
    return pd.concat(parts, ignore_index=True)[["by", "value", "grade", "count", "mean_pd", "bad_rate"]]


def oracle_gap(y: np.ndarray, model_pd: np.ndarray, true_pd: np.ndarray) -> dict[str, float]:
    """How far the model is from the simulator's true PD on the same rows (the best any model could do)."""
    model, oracle = pd_metrics(y, model_pd), pd_metrics(y, true_pd)
    return {
        "oracle_auc": oracle["auc"],
        "oracle_brier": oracle["brier"],
        "oracle_ece": oracle["ece"],
        "auc_gap_to_oracle": oracle["auc"] - model["auc"],
        "brier_gap_to_oracle": model["brier"] - oracle["brier"],
    }


@dataclass
class Evaluation:
    """Everything measured on the out-of-time test, as logged to MLflow and gated on."""

    metrics: dict[str, float]
    """Flat names: `test_auc`, `baseline_auc`, `score_psi`, `grades_monotone`, `oracle_auc`..."""
    by_group: pd.DataFrame
    grades: pd.DataFrame
    scored: pd.DataFrame
    """Per row: slice, y, pd, baseline_pd and the grouping columns (for plots)."""


def evaluate_model(model: PDModel, baseline_pd: np.ndarray, frame: pd.DataFrame, y: pd.Series, slices: pd.Series,
                   group_cols: list[str], true_pd: pd.Series | None = None, min_grade_count: int = 1,
                   grade_tolerance_z: float = 0.0, inputs: pd.DataFrame | None = None) -> Evaluation:
    """Test metrics of the model and the baseline, by segment/product, by grade, with stability and oracle gap.

    `inputs`: `model.prepare(frame)`, when the caller has it (a training run: preparing is a copy of the rows)."""
    pd_values = model.predict_pd(frame) if inputs is None else model.predict_pd_prepared(inputs)
    scored = pd.DataFrame({"slice": slices.to_numpy(), "y": y.to_numpy(), "pd": pd_values,
                           "baseline_pd": baseline_pd}, index=frame.index)
    for col in group_cols:
        scored[col] = frame[col].astype(object).fillna("missing").to_numpy()
    test = scored[scored["slice"] == "test"]
    metrics = {f"test_{k}": v for k, v in pd_metrics(test["y"].to_numpy(), test["pd"].to_numpy()).items()}
    metrics.update({f"baseline_{k}": v for k, v in pd_metrics(test["y"].to_numpy(), test["baseline_pd"].to_numpy())
                    .items() if k in ("auc", "gini", "ks", "brier", "ece")})
    metrics["score_psi"] = population_stability_index(scored.loc[scored["slice"] == "train", "pd"].to_numpy(),
                                                      test["pd"].to_numpy())
    grades = pd.DataFrame()
    if model.master_scale is not None:
        grades = grades_by(test, model.master_scale, group_cols)
        metrics["grades_monotone"] = float(model.master_scale.is_monotone(test["pd"].to_numpy(), test["y"].to_numpy(),
                                                                          min_grade_count, grade_tolerance_z))
    if true_pd is not None:
        oracle = true_pd.reindex(test.index)
        known = oracle.notna().to_numpy()
        metrics.update(oracle_gap(test["y"].to_numpy()[known], test["pd"].to_numpy()[known], oracle.to_numpy()[known]))
    return Evaluation(metrics, metrics_by(test, group_cols), grades, scored)
