"""How good a PD is: discrimination (AUC, Gini, KS), calibration (Brier, log loss, ECE), stability (PSI).

Pure functions on arrays and frames, so the same numbers serve training, gates, monitoring and tests.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve

from models.master_scale import MasterScale

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
