"""SHAP explanations of the PD booster: per-row contributions and importance (global, by group, compared).

Method: LightGBM's native exact TreeSHAP (`Booster.predict(pred_contrib=True)`). `shap.TreeExplainer` on a
LightGBM booster delegates to that very call (same numbers, plus a copy), and shap's own C++ TreeSHAP
mis-handles LightGBM categorical splits; `benchmarks/bench_explain.py` measures all three.

Scale: contributions are in the booster's log-odds (raw margin) space, where they add up exactly:
``base_value + sum(contributions) == raw_margin``. The calibrated PD is a monotone increasing function of
that margin (`models.calibration`), so a factor that raises the margin raises the PD and the ranking of
reasons is the same on both scales; only the size in PD points depends on where the merchant sits on the
calibration curve, which is why contributions are never quoted as PD points.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import pandas as pd
from rich.progress import Progress

from core.errors import ScfriskError
from models.pd_model import model_matrix

CHUNK_ROWS = 20_000
"""Rows per TreeSHAP call: bounds memory and drives the progress bar (exact TreeSHAP costs ~2 ms a row)."""


@dataclass(frozen=True)
class Explanation:
    """SHAP contributions (rows x features, log-odds) of one booster on one frame, plus its base value."""

    values: pd.DataFrame
    base_value: float

    @property
    def margin(self) -> pd.Series:
        """The raw margin the contributions add up to (equals `booster.predict(raw_score=True)`)."""
        return (self.values.sum(axis=1) + self.base_value).rename("raw_margin")


def explain(
    booster: lgb.Booster, X: pd.DataFrame, chunk_rows: int = CHUNK_ROWS, threads: int = 0
) -> Explanation:
    """Exact TreeSHAP of `booster` on its model input `X` (e.g. `PDModel.prepare(df)`), in chunks.

    `threads=1` suits one merchant per call (no thread start-up); 0 lets LightGBM use every core.
    """
    if X.empty:
        raise ScfriskError("nothing to explain: the model input has no rows")
    matrix = model_matrix(booster, X)
    starts = range(0, len(X), chunk_rows)
    parts = []
    with Progress(transient=True, disable=len(starts) < 2) as progress:
        task = progress.add_task(f"SHAP values for {len(X):,} rows", total=len(starts))
        for start in starts:
            parts.append(booster.predict(matrix[start : start + chunk_rows], pred_contrib=True, num_threads=threads))
            progress.advance(task)
    contrib = np.vstack(parts)
    return Explanation(
        pd.DataFrame(contrib[:, :-1], index=X.index, columns=booster.feature_name()), float(contrib[0, -1])
    )


def global_importance(values: pd.DataFrame) -> pd.Series:
    """Mean |SHAP| per feature, largest first: the average log-odds a feature moves a merchant by."""
    return values.abs().mean().sort_values(ascending=False).rename("mean_abs_shap")


def importance_by(values: pd.DataFrame, groups: pd.Series) -> pd.DataFrame:
    """Mean |SHAP| per feature (rows) for each group (columns), e.g. segment, product or grade.

    Features are ordered by overall importance so the table reads like the global ranking.
    """
    groups = pd.Series(np.asarray(groups), index=values.index, name=groups.name).astype(str)
    table = values.abs().groupby(groups, observed=True).mean().T
    return table.loc[global_importance(values).index]


def compare_importance(champion: pd.Series, challenger: pd.Series) -> pd.DataFrame:
    """Champion vs challenger importance side by side: shares of total and ranks, biggest movers visible."""
    table = pd.DataFrame({"champion": champion, "challenger": challenger}).fillna(0.0)
    for column in ("champion", "challenger"):
        table[f"{column}_share"] = table[column] / table[column].sum()
        table[f"{column}_rank"] = table[column].rank(ascending=False, method="min").astype(int)
    table["share_change"] = table["challenger_share"] - table["champion_share"]
    return table.sort_values("champion", ascending=False).rename_axis("feature").reset_index()
