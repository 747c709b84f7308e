"""Stability of a scored population: PSI of the score and CSI of each feature, month by month, and whether
a shifted feature simply follows the calendar.

A credit risk officer asks two things of a shift: did the score move (the model's output distribution),
and why did the features move? Features that accumulate with the platform's age (prior loans, a payment
history more and more merchants have) differ between any older and newer cohort without the applicants
being riskier; `calendar_trends` measures that instead of assuming it. Pure functions of frames.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from models.evaluation import population_stability_index
from models.pd_model import PDModel

STABLE_PSI, SHIFTED_PSI = 0.10, 0.25
"""The usual PSI/CSI bands: below 0.10 stable, 0.10-0.25 watch, above 0.25 shifted."""
TREND_RHO = 0.8
"""A feature trends with calendar time when its monthly level has a rank correlation with the month of at
least this size (in absolute value)."""
MIN_TREND_MONTHS = 4


def characteristic_stability(expected: pd.DataFrame, actual: pd.DataFrame) -> pd.DataFrame:
    """CSI per feature (PSI of its distribution), actual against expected; missing values form their own bin."""
    rows = []
    for name in expected.columns:
        before, after = expected[name], actual[name]
        if isinstance(before.dtype, pd.CategoricalDtype):
            codes_before, codes_after = before.cat.codes.to_numpy(float), after.cat.codes.to_numpy(float)
        else:
            floor = np.nanmin(np.concatenate([before.to_numpy(float), after.to_numpy(float), [0.0]])) - 1.0
            codes_before, codes_after = (
                before.fillna(floor).to_numpy(float),
                after.fillna(floor).to_numpy(float),
            )
        rows.append(
            {
                "feature": name,
                "csi": population_stability_index(codes_before, codes_after),
                "missing_train": before.isna().mean(),
                "missing_test": after.isna().mean(),
            }
        )
    table = pd.DataFrame(rows).sort_values("csi", ascending=False, ignore_index=True)
    table["status"] = pd.cut(
        table["csi"], [-np.inf, STABLE_PSI, SHIFTED_PSI, np.inf], labels=["stable", "watch", "shifted"]
    )
    return table.astype({"status": object})


def calendar_trends(inputs: pd.DataFrame, months: pd.Series) -> pd.DataFrame:
    """Per feature, the rank correlation of its monthly mean (among known values) and of its monthly share
    unknown with the month: how steadily its level moves with calendar time. NaN for categoricals and
    when fewer than `MIN_TREND_MONTHS` months are present."""
    numeric = [c for c in inputs.columns if not isinstance(inputs[c].dtype, pd.CategoricalDtype)]
    order = pd.Series(months.to_numpy(), index=inputs.index)
    if order.nunique() < MIN_TREND_MONTHS:
        return pd.DataFrame({"level_rho": np.nan, "missing_rho": np.nan}, index=inputs.columns)
    grouped = inputs[numeric].astype(float).groupby(order)
    month = pd.Series(np.arange(grouped.ngroups, dtype=float), index=grouped.mean().index)
    # Spearman as the Pearson correlation of ranks; a constant series has no trend (0, not NaN).
    level = grouped.mean().rank().corrwith(month).fillna(0.0)
    missing = inputs[numeric].isna().groupby(order).mean().astype(float).rank().corrwith(month).fillna(0.0)
    return pd.DataFrame({"level_rho": level, "missing_rho": missing}).reindex(inputs.columns)


def _trend_words(level_rho: float, missing_rho: float) -> str:
    words = []
    if abs(level_rho) >= TREND_RHO:
        words.append(f"level {'rises' if level_rho > 0 else 'falls'} month by month (rho {level_rho:+.2f})")
    if abs(missing_rho) >= TREND_RHO:
        words.append(
            f"share unknown {'rises' if missing_rho > 0 else 'falls'} month by month (rho {missing_rho:+.2f})"
        )
    return "; ".join(words) or "no steady trend with the month"


def stability_table(
    model: PDModel,
    train: pd.DataFrame,
    test: pd.DataFrame,
    population: pd.DataFrame,
    time_col: str | None,
    importance: pd.Series,
) -> pd.DataFrame:
    """CSI test against train, with each feature's share of the model's importance and, with a time
    column, whether its level trends with the calendar month over the whole population."""
    csi = characteristic_stability(model.prepare(train), model.prepare(test))
    share = importance / importance.sum() if importance.sum() > 0 else importance * 0.0
    csi["importance_share"] = csi["feature"].map(share).fillna(0.0).to_numpy()
    if time_col:
        months = pd.to_datetime(population[time_col], errors="coerce").dt.to_period("M")
        trends = calendar_trends(model.prepare(population), months)
        csi["trend"] = [
            _trend_words(trends.at[f, "level_rho"], trends.at[f, "missing_rho"])
            if not np.isnan(trends.at[f, "level_rho"]) or not np.isnan(trends.at[f, "missing_rho"])
            else "categorical: no trend measured"
            for f in csi["feature"]
        ]
        csi["trends_with_time"] = (trends.loc[csi["feature"]].abs() >= TREND_RHO).any(axis=1).to_numpy()
    return csi


def monthly_stability(
    model: PDModel, frames: Mapping[str, pd.DataFrame]
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Score PSI and feature CSI of each month against the first month, and the score PSI against the month
    before: whether the scored population drifts over time, month by month."""
    if len(frames) < 2:
        return None
    names = list(frames)
    inputs = {m: model.prepare(frames[m]) for m in names}
    scores = {m: model.predict_pd_prepared(inputs[m]) for m in names}
    base = names[0]
    rows, csi_columns = [], {}
    for i, month in enumerate(names):
        csi = characteristic_stability(inputs[base], inputs[month]).set_index("feature")["csi"]
        csi_columns[month] = csi
        rows.append(
            {
                "month": month,
                "rows": len(inputs[month]),
                "mean PD": float(scores[month].mean()),
                "score PSI vs first month": population_stability_index(scores[base], scores[month]),
                "score PSI vs previous month": (
                    population_stability_index(scores[names[i - 1]], scores[month]) if i else 0.0
                ),
                "features shifted (CSI > 0.25)": int((csi > SHIFTED_PSI).sum()),
            }
        )
    csi_table = pd.DataFrame(csi_columns)
    csi_table = csi_table.loc[csi_table.max(axis=1).sort_values(ascending=False).index]
    return pd.DataFrame(rows), csi_table
