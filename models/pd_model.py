"""The fitted default model as one object: booster, feature contract, calibrator and master scale.

Everything downstream (explanations, limits, the service) scores through `PDModel`, so the way raw values
become model input -- sentinels, unknown categories, missing columns -- is decided here once.
Saved as the booster's own text format plus one JSON file: no pickled code.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.errors import ScfriskError
from models.calibration import Calibrator
from models.master_scale import MasterScale


def _lightgbm_without_sklearn_api() -> ModuleType:
    """LightGBM without its scikit-learn estimators, which the project does not use (it trains with
    `lgb.train`): LightGBM imports scikit-learn and SciPy's statistics for them, ~0.5 s of every command
    that only scores. A None entry in `sys.modules` makes that import fail, and LightGBM leaves its
    estimators out; scikit-learn stays importable for the code that needs it."""
    if "lightgbm" in sys.modules or "sklearn" in sys.modules:
        import lightgbm

        return lightgbm
    sys.modules["sklearn"] = None
    try:
        import lightgbm
    finally:
        del sys.modules["sklearn"]
    return lightgbm


lgb = _lightgbm_without_sklearn_api()

FeatureKind = Literal["numeric", "categorical"]

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "-", "-999", "-9999", "-99999"})
"""Text that means 'no value' in exported tables (case-insensitive, stripped)."""
NUMERIC_SENTINELS = (-999.0, -9999.0, -99999.0)
"""Numeric codes that legacy systems use for 'missing'; they must not look like very small values."""

BOOSTER_FILE = "booster.txt"
SPEC_FILE = "pd_model.json"
FEW_ROWS = 64
"""Up to this many rows the booster predicts on one thread: starting threads costs more than the work."""


def model_matrix(booster: lgb.Booster, X: pd.DataFrame) -> np.ndarray:
    """`X` as the float matrix LightGBM scores, categoricals as codes of the booster's own training levels.

    Same numbers as handing LightGBM the DataFrame, without its per-call pandas conversion, which costs more
    than TreeSHAP itself for a single merchant.
    """
    names = booster.feature_name()
    missing = [name for name in names if name not in X.columns]
    if missing:
        raise ScfriskError(f"model input lacks feature(s) {missing[:10]} that the booster was trained on")
    frame = X[names]
    categorical = [isinstance(dtype, pd.CategoricalDtype) for dtype in frame.dtypes]
    if not any(categorical):
        return frame.to_numpy(float)
    matrix = np.empty(frame.shape)
    numeric = np.flatnonzero(~np.array(categorical))
    matrix[:, numeric] = frame.iloc[:, numeric].to_numpy(float)  # one block, not a column at a time
    for j, levels in zip(np.flatnonzero(categorical), booster.pandas_categorical or []):
        codes = pd.Categorical(frame.iloc[:, j], categories=levels).codes.astype(float)
        matrix[:, j] = np.where(codes < 0, np.nan, codes)
    return matrix


@dataclass(frozen=True)
class FeatureSpec:
    """One model input: numeric, or categorical with the levels seen in training (others become missing)."""

    name: str
    kind: FeatureKind
    direction: int = 0
    """+1: a larger value must never lower the PD, -1: never raise it, 0: unconstrained."""
    levels: tuple[str, ...] = ()


def clean_numeric(frame: pd.DataFrame) -> np.ndarray:
    """Floats (rows x columns) with text, missing tokens and sentinels turned into NaN.

    One 2-D array for all numeric columns: only text columns are parsed one by one, the masking is a single
    array operation, so a one-row payload does not pay pandas overhead per feature.
    """
    text = np.array([not pd.api.types.is_numeric_dtype(dtype) for dtype in frame.dtypes], dtype=bool)
    numbers = np.empty(frame.shape, order="F")  # columns contiguous: the model frame's block without a copy
    if not text.any():
        numbers[:] = frame.to_numpy(dtype=float, na_value=np.nan)
    else:
        numbers[:, ~text] = frame.loc[:, ~text].to_numpy(dtype=float, na_value=np.nan)
        for j, column in zip(np.flatnonzero(text), frame.loc[:, text].to_numpy(dtype=object).T):
            numbers[:, j] = pd.to_numeric(column, errors="coerce")
    numbers[np.isin(numbers, NUMERIC_SENTINELS) | ~np.isfinite(numbers)] = np.nan
    return numbers


def clean_text(values: pd.Series) -> pd.Series:
    """Stripped strings (object dtype) with missing tokens turned into NaN; 1.0 and 1 give the same level."""
    if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
        values = values.astype("Int64")
    text = values.astype("string").str.strip()
    missing = text.isna() | text.str.lower().isin(MISSING_TOKENS)
    return text.astype(object).where(~missing.to_numpy(dtype=bool), np.nan)


def prepare_features(df: pd.DataFrame, features: tuple[FeatureSpec, ...]) -> pd.DataFrame:
    """Model input frame: floats for numerics, fixed-level categoricals; unknown levels and sentinels -> NaN."""
    missing = [f.name for f in features if f.name not in df.columns]
    if missing:
        raise ScfriskError(
            f"input lacks {len(missing)} model feature(s): {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}; columns present: {', '.join(map(str, df.columns[:20]))}"
        )
    numeric = [f.name for f in features if f.kind == "numeric"]
    prepared = pd.DataFrame(clean_numeric(df[numeric]), index=df.index, columns=numeric)
    for position, spec in enumerate(features):
        if spec.kind == "categorical":
            levels = pd.Categorical(clean_text(df[spec.name]), categories=list(spec.levels))
            prepared.insert(position, spec.name, levels)
    return prepared


@dataclass
class PDModel:
    """A calibrated probability-of-default model; `predict_pd` is what every consumer should call."""

    booster: lgb.Booster
    features: tuple[FeatureSpec, ...]
    calibrator: Calibrator
    master_scale: MasterScale | None = None
    metadata: dict[str, Any] | None = None

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        """Raw feature values -> the frame the booster was trained on (same columns, dtypes, levels)."""
        return prepare_features(df, self.features)

    def raw_margin(self, df: pd.DataFrame) -> np.ndarray:
        """Uncalibrated log-odds of the booster (what SHAP values add up to)."""
        return self.raw_margin_prepared(self.prepare(df))

    def raw_margin_prepared(self, inputs: pd.DataFrame) -> np.ndarray:
        """`raw_margin` of a frame `prepare` already made, so a caller that also explains it prepares once."""
        threads = {"num_threads": 1} if len(inputs) <= FEW_ROWS else {}  # else the booster's own setting
        return self.booster.predict(model_matrix(self.booster, inputs), raw_score=True, **threads)

    def predict_pd(self, df: pd.DataFrame) -> np.ndarray:
        """Calibrated probability of default, one per row."""
        return self.predict_pd_prepared(self.prepare(df))

    def predict_pd_prepared(self, inputs: pd.DataFrame) -> np.ndarray:
        """`predict_pd` of a frame `prepare` already made."""
        return self.calibrator.transform(self.raw_margin_prepared(inputs))

    def fingerprint(self) -> str:
        """A hash of all `predict_pd` depends on (booster, inputs, calibration): PDs kept for one model are
        reused only by the same model, whatever version number a registry gave it."""
        spec = {"booster": self.booster.model_to_string(), "features": [asdict(f) for f in self.features],
                "calibrator": self.calibrator.to_dict()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def grade(self, df: pd.DataFrame) -> np.ndarray:
        if self.master_scale is None:
            raise ScfriskError("this model was saved without a master scale; grades are not available")
        return self.master_scale.assign(self.predict_pd(df))

    def save(self, directory: Path | str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(directory / BOOSTER_FILE))
        spec = {
            "features": [asdict(f) for f in self.features],
            "calibrator": self.calibrator.to_dict(),
            "master_scale": self.master_scale.model_dump() if self.master_scale else None,
            "metadata": self.metadata or {},
        }
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> PDModel:
        directory = Path(directory)
        if not (directory / SPEC_FILE).is_file() or not (directory / BOOSTER_FILE).is_file():
            raise ScfriskError(f"{directory} is not a saved PD model (needs {BOOSTER_FILE} and {SPEC_FILE})")
        spec = json.loads((directory / SPEC_FILE).read_text())
        features = tuple(
            FeatureSpec(f["name"], f["kind"], int(f["direction"]), tuple(f["levels"])) for f in spec["features"]
        )
        return cls(
            booster=lgb.Booster(model_file=str(directory / BOOSTER_FILE)),
            features=features,
            calibrator=Calibrator.from_dict(spec["calibrator"]),
            master_scale=MasterScale(**spec["master_scale"]) if spec["master_scale"] else None,
            metadata=spec["metadata"],
        )
