"""Turning booster log-odds into a probability of default that matches observed default rates.

Limits and prices multiply the PD, so a well-ranked but mis-scaled score is not enough. The method
(Platt or isotonic) is chosen on the validation cohort by cross-fitted log loss, so the choice is not
flattered by fitting and scoring on the same rows.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Method = Literal["platt", "isotonic"]
METHODS: tuple[Method, ...] = ("platt", "isotonic")
PD_FLOOR = 1e-5
"""No PD is exactly 0 or 1: log loss stays finite and no grade is 'risk free'."""


class Calibrator:
    """Monotone map margin -> PD. sklearn-style: `__init__` stores, `fit` learns attributes ending in `_`."""

    def __init__(self, method: Method = "platt") -> None:
        if method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
        self.method = method

    def fit(self, margin: np.ndarray, y: np.ndarray) -> Calibrator:
        # scikit-learn (and SciPy) only where a calibrator is fitted: scoring needs neither.
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        margin, y = np.asarray(margin, float), np.asarray(y, int)
        if self.method == "platt":
            lr = LogisticRegression(C=1e6, max_iter=1000).fit(margin.reshape(-1, 1), y)
            self.coef_, self.intercept_ = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        else:
            iso = IsotonicRegression(out_of_bounds="clip", increasing=True).fit(margin, y)
            self.x_, self.y_ = iso.X_thresholds_.astype(float), iso.y_thresholds_.astype(float)
        return self

    def transform(self, margin: np.ndarray) -> np.ndarray:
        margin = np.asarray(margin, float)
        if self.method == "platt":
            pd_values = 1.0 / (1.0 + np.exp(-(self.coef_ * margin + self.intercept_)))
        else:
            pd_values = np.interp(margin, self.x_, self.y_)
        return np.clip(pd_values, PD_FLOOR, 1.0 - PD_FLOOR)

    def to_dict(self) -> dict[str, Any]:
        if self.method == "platt":
            return {"method": "platt", "coef": self.coef_, "intercept": self.intercept_}
        return {"method": "isotonic", "x": self.x_.tolist(), "y": self.y_.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        calibrator = cls(data["method"])
        if calibrator.method == "platt":
            calibrator.coef_, calibrator.intercept_ = float(data["coef"]), float(data["intercept"])
        else:
            calibrator.x_, calibrator.y_ = np.asarray(data["x"], float), np.asarray(data["y"], float)
        return calibrator


def cross_fitted_log_loss(method: Method, margin: np.ndarray, y: np.ndarray, seed: int, folds: int = 5) -> float:
    """Log loss of a calibrator scored only on folds it was not fitted on."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    margin, y = np.asarray(margin, float), np.asarray(y, int)
    folds = max(2, min(folds, int(np.bincount(y, minlength=2).min())))
    out = np.empty_like(margin)
    for fit_idx, score_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(margin, y):
        out[score_idx] = Calibrator(method).fit(margin[fit_idx], y[fit_idx]).transform(margin[score_idx])
    return float(log_loss(y, out, labels=[0, 1]))


def choose_calibrator(margin: np.ndarray, y: np.ndarray, seed: int) -> tuple[Calibrator, dict[str, float]]:
    """The method with the lower cross-fitted log loss, refitted on all rows; also every method's score."""
    scores = {method: cross_fitted_log_loss(method, margin, y, seed) for method in METHODS}
    best = min(scores, key=scores.get)
    return Calibrator(best).fit(margin, y), scores
