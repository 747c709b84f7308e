"""The public credit tables of `data_samples/public/`, sliced as `scfrisk train --table` slices them, and
the untuned LightGBM they are compared with (benchmarks/bench_public.py, tests/test_public_tables.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from core.settings import Settings
from models.pd_model import FeatureSpec, prepare_features
from models.training import binary_target, infer_features
from pipelines.train import assign_slices

PUBLIC = Path(__file__).resolve().parents[1] / "data_samples" / "public"
TABLES = {"German credit": ("german_credit.parquet", "creditability"),
          "SBA loans": ("sba_loans.parquet", "MIS_Status")}
"""Table name -> (file under data_samples/public, target column); sources in data_samples/public/README.md."""

@dataclass(frozen=True)
class TableSplit:
    """One table sliced the way `scfrisk train --table` slices it, with its inferred model input."""

    frame: pd.DataFrame
    y: pd.Series
    slices: pd.Series
    features: tuple[FeatureSpec, ...]


def table_split(settings: Settings, frame: pd.DataFrame, target: str) -> TableSplit:
    """The `--table` path's target coding, split (seeded by `settings.seed`) and feature contract."""
    y = binary_target(frame[target])
    slices = assign_slices(frame, y, None, False, settings)
    return TableSplit(frame, y, slices, infer_features(frame[slices == "train"], {target}))


def untuned_lightgbm_pd(split: TableSplit, seed: int) -> np.ndarray:
    """Test-row PDs of a default-parameter LGBMClassifier fitted on the train and validation slices."""
    X = prepare_features(split.frame, split.features)
    fit, test = (split.slices != "test").to_numpy(), (split.slices == "test").to_numpy()
    model = lgb.LGBMClassifier(random_state=seed, verbose=-1).fit(X[fit], split.y.to_numpy()[fit])
    return model.predict_proba(X[test])[:, 1]
