"""Train / validation / test slices: by application month when there is a time, stratified otherwise.

A random split alone flatters a credit model (same-period cohorts share the economy), so the default is
out of time: oldest cohorts train, the next ones validate (early stopping, calibration), the latest test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.errors import ScfriskError

SLICES = ("train", "valid", "test")


def time_split(times: pd.Series, valid_months: int, test_months: int = 0) -> pd.Series:
    """Slice name per row: the last `test_months` calendar months test (0: no test slice, e.g. when a separate
    test table is given), the `valid_months` before validate, the rest trains."""
    stamps = pd.to_datetime(times, errors="coerce")
    if stamps.isna().any():
        raise ScfriskError(
            f"time column '{times.name}' has {int(stamps.isna().sum())} missing or unparseable value(s); "
            "every row needs a date for an out-of-time split"
        )
    months = stamps.dt.to_period("M")
    last = months.max()
    test_start, valid_start = last - (test_months - 1), last - (test_months + valid_months - 1)
    slices = pd.Series(np.where(months >= test_start, "test", np.where(months >= valid_start, "valid", "train")),
                       index=times.index, name="slice")
    if set(slices) != set(SLICES[: 3 if test_months else 2]):
        span = f"{months.min()}..{last}"
        raise ScfriskError(
            f"time column '{times.name}' spans {span} ({months.nunique()} months): too short for "
            f"{valid_months} validation + {test_months} test months plus a training period; "
            "lower model.valid_months / model.test_months"
        )
    return slices


def stratified_split(y: pd.Series, valid_frac: float, test_frac: float, seed: int) -> pd.Series:
    """Slice name per row, each slice with the same default rate (for tables without a time column)."""
    from sklearn.model_selection import train_test_split  # here only: scoring commands need no scikit-learn

    slices = pd.Series("train", index=y.index, name="slice")
    rest = y.index
    if test_frac > 0:
        rest, test = train_test_split(y.index, test_size=test_frac, stratify=y, random_state=seed)
        slices[test] = "test"
    _, valid = train_test_split(rest, test_size=valid_frac / (1 - test_frac), stratify=y[rest], random_state=seed)
    slices[valid] = "valid"
    return slices


def split_summary(slices: pd.Series, y: pd.Series, times: pd.Series | None = None) -> pd.DataFrame:
    """Rows, defaults, default rate and (with times) first/last date per slice, for the run log."""
    frame = pd.DataFrame({"slice": slices, "bad": y})
    summary = frame.groupby("slice").agg(rows=("bad", "size"), defaults=("bad", "sum"), default_rate=("bad", "mean"))
    if times is not None:
        stamps = pd.to_datetime(times).groupby(slices)
        summary["start"] = stamps.min().dt.date.astype(str)
        summary["end"] = stamps.max().dt.date.astype(str)
    return summary.reindex([s for s in SLICES if s in summary.index])
