"""Fitting the PD model: feature contract, monotone LightGBM with a small time-ordered search, calibration,
and the logistic-regression baseline every booster has to beat on the same slices.

The chosen candidate is refitted on train + valid before it is used (see `train_pd_model`).

Given a Dask client, every fit runs data-parallel on the cluster's workers (`models.distributed`, for
training sets larger than one machine should hold), fitting the booster this process would; it returns an
ordinary `lgb.Booster`, so calibration, SHAP, the gates and the saved model do not know which way it was
trained.

Monotone constraints use LightGBM's "basic" method: its data-parallel learner has no other (LightGBM's
`Config` switches "intermediate" and "advanced" to "basic" when `num_machines` > 1, as a worker holds the summed
histograms of only some features, and the other methods re-search other leaves' splits), so with any other
method here the two engines would fit different models (issue 15). On the sample "basic" also scores as well
as "intermediate" locally (docs/scaling.md, "Training on the workers").

Classes are NOT reweighted: reweighting inflates the booster's scores and the calibrator would then have to
undo it on a small validation cohort. Early stopping and the search use validation log loss, which rewards
both ranking and scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from rich.progress import Progress
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from core.errors import ScfriskError
from models.calibration import choose_calibrator
from models.distributed import binned, binning_rows, fit_on_cluster
from models.master_scale import MasterScale
from models.pd_model import FeatureSpec, PDModel, clean_text, prepare_features

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

MAX_LEVELS = 200
"""Most frequent training levels kept per categorical feature; rarer ones score as missing."""
NUMERIC_SHARE = 0.98
"""A text column whose non-missing values parse as numbers this often is numeric (text-coded numbers)."""
POSITIVE_LABELS = frozenset({"1", "true", "yes", "y", "bad", "default", "defaulted"})

BASE_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": "binary_logloss",
    "learning_rate": 0.05,
    "bagging_freq": 1,
    "monotone_constraints_method": "basic",  # the only one LightGBM's data-parallel learner runs (above)
    "deterministic": True,
    "force_col_wise": True,
    "verbosity": -1,
}
SEARCH_SPACE: dict[str, list[Any]] = {
    "num_leaves": [15, 31, 63],
    "min_child_samples": [20, 50, 200],
    "feature_fraction": [0.7, 0.9],
    "bagging_fraction": [0.8, 1.0],
    "lambda_l2": [0.0, 1.0, 10.0],
}
DEFAULT_CANDIDATE = {"num_leaves": 31, "min_child_samples": 50, "feature_fraction": 0.9, "bagging_fraction": 0.8,
                     "lambda_l2": 1.0}


def binary_target(values: pd.Series) -> pd.Series:
    """0/1 default flag from numeric 0/1, booleans, or two text labels such as good/bad, no/yes."""
    if values.isna().any():
        raise ScfriskError(f"target column '{values.name}' has {int(values.isna().sum())} missing value(s)")
    text = values.map(_label)
    levels = sorted(set(text))
    positive = [level for level in levels if level in POSITIVE_LABELS]
    if len(levels) != 2 or len(positive) != 1:
        raise ScfriskError(
            f"target column '{values.name}' must have two values, one of them meaning default "
            f"({', '.join(sorted(POSITIVE_LABELS))}); found {levels[:10]}"
        )
    return (text == positive[0]).astype(int).rename(values.name)


def _label(value: Any) -> str:
    if isinstance(value, (bool, np.bool_, int, float, np.number)) and float(value) in (0.0, 1.0):
        return str(int(value))
    return str(value).strip().lower()


def infer_features(frame: pd.DataFrame, exclude: set[str], directions: dict[str, int] | None = None,
                   kinds: dict[str, str] | None = None) -> tuple[FeatureSpec, ...]:
    """Feature contract from training rows: kind per column (given or inferred), levels, monotone direction.

    Dates are skipped: an absolute date lets a model learn the period rather than the merchant.
    """
    directions, kinds = directions or {}, kinds or {}
    specs = []
    for name in frame.columns:
        if name in exclude:
            continue
        column = frame[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            log.info("skipping date column %s as a feature", name)
            continue
        kind = kinds.get(name) or _infer_kind(column)
        if kind == "numeric":
            specs.append(FeatureSpec(name, "numeric", int(np.sign(directions.get(name, 0)))))
        else:
            counts = clean_text(column).value_counts()
            specs.append(FeatureSpec(name, "categorical", 0, tuple(sorted(counts.index[:MAX_LEVELS]))))
    if not specs:
        raise ScfriskError(f"no feature columns left after excluding {sorted(exclude)}")
    return tuple(specs)


def _infer_kind(column: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return "numeric"
    text = clean_text(column).dropna()
    if text.empty:
        return "numeric"
    return "numeric" if pd.to_numeric(text, errors="coerce").notna().mean() >= NUMERIC_SHARE else "categorical"


class LogisticBaseline:
    """Standardised numerics (median-imputed, with missing flags) and one-hot categoricals into a logistic
    regression: the transparent model the booster has to beat."""

    def __init__(self, features: tuple[FeatureSpec, ...], seed: int = 0) -> None:
        self.features = features
        self.seed = seed

    def _design(self, X: pd.DataFrame) -> pd.DataFrame:
        design = X.copy(deep=False)  # only the categoricals change: the numeric columns are not copied
        for spec in self.features:
            if spec.kind == "categorical":
                design[spec.name] = design[spec.name].astype(object).where(design[spec.name].notna(), "__missing__")
        return design

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> LogisticBaseline:
        numeric = [f.name for f in self.features if f.kind == "numeric"]
        categorical = [f.name for f in self.features if f.kind == "categorical"]
        columns = ColumnTransformer([
            ("numeric", make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                                    keep_empty_features=True), StandardScaler()), numeric),
            ("categorical", OneHotEncoder(handle_unknown="ignore", min_frequency=20), categorical),
        ])
        self.pipeline_ = make_pipeline(columns, LogisticRegression(C=0.1, max_iter=2000, random_state=self.seed))
        self.pipeline_.fit(self._design(X), y)
        return self

    def predict_pd(self, X: pd.DataFrame) -> np.ndarray:
        return self.pipeline_.predict_proba(self._design(X))[:, 1]


def _booster_params(features: tuple[FeatureSpec, ...], params: dict[str, Any], seed: int,
                    threads: int) -> dict[str, Any]:
    return {**BASE_PARAMS, **params, "seed": seed, "num_threads": threads,
            "monotone_constraints": [f.direction if f.kind == "numeric" else 0 for f in features]}


def boost(params: dict[str, Any], X: pd.DataFrame, y: np.ndarray, rounds: int,
          client: Client | None = None) -> lgb.Booster:
    """`rounds` of boosting on (X, y): in this process, or data-parallel on the workers of `client`
    (`models.distributed`: the same booster, the returned one a local one)."""
    if client is not None:
        return fit_on_cluster(client, params, X, y, rounds)
    return lgb.train(params, binned(X, y, params, binning_rows(X, params["seed"])), num_boost_round=rounds)


def fit_booster(X_train: pd.DataFrame, y_train: np.ndarray, X_valid: pd.DataFrame, y_valid: np.ndarray,
                features: tuple[FeatureSpec, ...], params: dict[str, Any], seed: int, max_rounds: int,
                threads: int = 1, client: Client | None = None) -> lgb.Booster:
    """One LightGBM fit with monotone constraints from the feature directions, early-stopped on validation
    (on the cluster of `client`, if given)."""
    params = _booster_params(features, params, seed, threads)
    patience = max(10, max_rounds // 20)
    if client is not None:
        return fit_on_cluster(client, params, X_train, y_train, max_rounds, (X_valid, y_valid), patience)
    train = binned(X_train, y_train, params, binning_rows(X_train, seed))
    valid = lgb.Dataset(X_valid, label=y_valid, reference=train)
    return lgb.train(params, train, num_boost_round=max_rounds, valid_sets=[valid],
                     callbacks=[lgb.early_stopping(patience, verbose=False)])


def refit_booster(X: pd.DataFrame, y: np.ndarray, features: tuple[FeatureSpec, ...], params: dict[str, Any],
                  seed: int, rounds: int, threads: int = 1, client: Client | None = None) -> lgb.Booster:
    """The chosen candidate refitted on more rows for a fixed number of rounds (no early stopping)."""
    return boost(_booster_params(features, params, seed, threads), X, y, rounds, client)


def search_candidates(trials: int, seed: int) -> list[dict[str, Any]]:
    """The default candidate, then `trials - 1` distinct random draws from the grid (same seed, same list)."""
    rng = np.random.default_rng(seed)
    candidates, seen = [DEFAULT_CANDIDATE], {tuple(DEFAULT_CANDIDATE.values())}
    grid_size = int(np.prod([len(v) for v in SEARCH_SPACE.values()]))
    while len(candidates) < min(trials, grid_size):
        draw = {key: values[rng.integers(len(values))] for key, values in SEARCH_SPACE.items()}
        if tuple(draw.values()) not in seen:
            seen.add(tuple(draw.values()))
            candidates.append(draw)
    return candidates


def rows_of(X: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """`X[mask]`; a view when the rows are one run (a time split of rows in time order: every slice), so the
    process does not hold the slices' features twice."""
    picked = np.flatnonzero(mask)
    if len(picked) and picked[-1] - picked[0] + 1 == len(picked):
        return X.iloc[picked[0]:picked[-1] + 1]
    return X[mask]


@dataclass
class TrainingResult:
    model: PDModel
    baseline: LogisticBaseline
    params: dict[str, Any]
    search_log: pd.DataFrame
    calibration_scores: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


def train_pd_model(frame: pd.DataFrame, y: pd.Series, slices: pd.Series, features: tuple[FeatureSpec, ...], *,
                   seed: int, max_rounds: int, search_trials: int, threads: int = 1,
                   master_scale: MasterScale | None = None, client: Client | None = None) -> TrainingResult:
    """Search on train/valid, keep the best early-stopped booster, calibrate it on valid, fit the baseline.

    With `client`, the boosters are fitted on its Dask cluster (`boost`); the rest runs here."""
    X = prepare_features(frame, features)
    is_train, is_valid = (slices == "train").to_numpy(), (slices == "valid").to_numpy()
    y_all = y.to_numpy()
    X_train, X_valid = rows_of(X, is_train), rows_of(X, is_valid)
    for name, mask in (("training", is_train), ("validation", is_valid)):
        if len(np.unique(y_all[mask])) < 2:
            raise ScfriskError(f"the {name} slice ({int(mask.sum())} rows) needs both defaults and non-defaults")
    rows = []
    best: tuple[float, lgb.Booster, dict[str, Any]] | None = None
    candidates = search_candidates(search_trials, seed)
    with Progress(transient=True) as progress:
        task = progress.add_task("hyper-parameter search", total=len(candidates))
        for candidate in candidates:
            booster = fit_booster(X_train, y_all[is_train], X_valid, y_all[is_valid], features,
                                  candidate, seed, max_rounds, threads, client)
            margin = booster.predict(X_valid, raw_score=True)
            loss = float(log_loss(y_all[is_valid], 1 / (1 + np.exp(-margin)), labels=[0, 1]))
            rows.append({**candidate, "rounds": booster.best_iteration, "valid_log_loss": loss,
                         "valid_auc": float(roc_auc_score(y_all[is_valid], margin))})
            if best is None or loss < best[0]:
                best = (loss, booster, candidate)
            progress.advance(task)
    _, searched, params = best
    calibrator, calibration_scores = choose_calibrator(searched.predict(X_valid, raw_score=True),
                                                       y_all[is_valid], seed)
    del X_train, X_valid
    # The validation slice has picked the candidate, its rounds and the calibrator; the final booster also
    # learns from it (the newest cohort, with a time split), for rounds scaled to the rows so that each row
    # weighs as in the searched fit. Without this the model learns from 60% of a table where a plain
    # LightGBM learns from 80% (train + valid) and loses its tuning edge (docs/benchmarks.md, "Public credit
    # tables"). The calibrator, fitted on held-out margins of the same candidate, carries over.
    development = is_train | is_valid
    refit_rounds = max(1, round(searched.best_iteration * development.sum() / is_train.sum()))
    X_development = rows_of(X, development)
    booster = refit_booster(X_development, y_all[development], features, params, seed, refit_rounds, threads,
                            client)
    log.info("best of %d candidates: %s, %d rounds (%d refitted on train + valid); calibration %s",
             len(candidates), params, searched.best_iteration, refit_rounds, calibrator.method)
    model = PDModel(booster=booster, features=features, calibrator=calibrator, master_scale=master_scale)
    baseline = LogisticBaseline(features, seed).fit(X_development, y_all[development])  # the model's rows
    return TrainingResult(model, baseline,
                          {**params, "monotone_constraints_method": BASE_PARAMS["monotone_constraints_method"],
                           "rounds": searched.best_iteration, "refit_rounds": refit_rounds},
                          pd.DataFrame(rows), calibration_scores)
