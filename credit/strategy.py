"""Strategy analytics for risk officers: what a policy approves, loses and earns, and where to cut off.

Works on limits tables (`credit.limits`): the current book (expected figures only) or an out-of-time
backtest, where realised defaults turn expected loss and profit into realised ones. Tables are pure
functions; `reporting.strategy_report` renders them for risk officers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import ScfriskError
from credit.limits import EXCLUSION_RULES, check_input, expected_profit, product_limits
from credit.policy import CreditPolicy


def backtest_limits(test: pd.DataFrame, policy: CreditPolicy) -> pd.DataFrame:
    """Limits each out-of-time application would have got for its own product, with realised outcomes.

    `test` holds one row per application: pd, defaulted (0/1), product, segment and the limit features.
    """
    missing = [c for c in ("defaulted", "product") if c not in test.columns]
    if missing:
        raise ScfriskError(f"backtest set misses columns {missing}")
    if "merchant_id" not in test.columns:
        test = test.assign(merchant_id=test.index.astype(str))
    check_input(test, policy.master_scale)
    frames = []
    for product, group in test.groupby("product", sort=False, observed=True):
        terms = policy.product(str(product))  # a product the policy does not know: PolicyError
        limits = product_limits(group, str(product), policy)
        defaulted = group["defaulted"].to_numpy(dtype=float)
        limits["defaulted"] = defaulted
        limits["realised_loss"] = defaulted * terms.lgd * limits["ead"].to_numpy()
        apr = np.nan_to_num(limits["apr"].to_numpy())
        limits["realised_profit"] = expected_profit(limits["ead"].to_numpy(), apr, defaulted, terms)
        frames.append(limits)
    return pd.concat(frames).sort_index()


PD_GRID = np.concatenate([[0.0], np.geomspace(1e-6, 1.0, 2048)])
"""Upper edges of the PD bins the cut-off curve sums eligible rows over: log-spaced, each 0.7% of its PD
wide (PDs below 1e-6 share the first), so a cut-off lies within one bin of the PD quantile it stands for;
every figure at a cut-off is exact (see `cutoff_curve`)."""


@dataclass(frozen=True)
class StrategySums:
    """Sums, counts and maxima per group of a limits table or backtest: all that `strategy_tables` reads, and
    mergeable (`merge_sums`), so a book computed in parts is summed where each part is computed and its tables
    built from the parts' sums without the book in one place."""

    by_grade: pd.DataFrame
    by_product: pd.DataFrame
    by_segment: pd.DataFrame
    exclusions: pd.DataFrame
    cutoffs: pd.DataFrame
    """Eligible rows per product and PD bin (`PD_GRID`): count, PD sum and maximum, profit sums."""


def _sums(limits: pd.DataFrame, by: str) -> pd.DataFrame:
    """`summarise`'s sums and counts per value of `by`."""
    eligible = limits["eligible"].to_numpy()
    frame = pd.DataFrame({
        by: limits[by], "count": 1, "eligible": eligible.astype(np.int64),
        "approved_pd": np.where(eligible, limits["pd"], 0.0), "total_limit": limits["limit"],
        "expected_loss": limits["expected_loss"], "expected_profit": limits["expected_profit"],
    })
    if "defaulted" in limits.columns:
        frame["approved_bad"] = np.where(eligible, limits["defaulted"], 0.0)
        frame["realised_loss"] = limits["realised_loss"]
        frame["realised_profit"] = limits["realised_profit"]
    return frame.groupby(by, observed=True).sum().reset_index()


def _exclusion_sums(limits: pd.DataFrame) -> pd.DataFrame:
    """Rows, PD sum (and defaults) per product and the first rule each row failed (`eligible`: none)."""
    rule = limits["exclusion_reason"].astype(object).where(~limits["eligible"], "eligible").astype(str)
    frame = pd.DataFrame({"product": limits["product"], "rule": rule, "count": 1, "pd_sum": limits["pd"]})
    if "defaulted" in limits.columns:
        frame["defaulted"] = limits["defaulted"]
    return frame.groupby(["product", "rule"], observed=True).sum().reset_index()


def _cutoff_sums(limits: pd.DataFrame) -> pd.DataFrame:
    """Eligible rows per product and PD bin: a row of PD p is in the first bin whose upper edge is >= p."""
    eligible = limits[limits["eligible"]]
    pd_values = eligible["pd"].to_numpy()
    frame = pd.DataFrame({"product": eligible["product"], "bin": np.searchsorted(PD_GRID, pd_values, side="left"),
                          "approved": 1, "pd_sum": pd_values, "pd_max": pd_values,
                          "expected_profit": eligible["expected_profit"]})
    if "defaulted" in limits.columns:
        frame["defaulted"] = eligible["defaulted"]
        frame["realised_profit"] = eligible["realised_profit"]
    return _group(frame, ["product", "bin"])


def _group(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sums per group, the PD maximum as a maximum."""
    how = {c: "max" if c == "pd_max" else "sum" for c in frame.columns if c not in keys}
    return frame.groupby(keys, observed=True).agg(how).reset_index()


def strategy_sums(limits: pd.DataFrame) -> StrategySums:
    """The sums of a limits table or backtest (or of one part of it) that its strategy tables are built from."""
    return StrategySums(
        by_grade=_sums(limits, "grade"),
        by_product=_sums(limits, "product"),
        by_segment=_sums(limits, "segment"),
        exclusions=_exclusion_sums(limits),
        cutoffs=_cutoff_sums(limits),
    )


SUM_KEYS = {"by_grade": ["grade"], "by_product": ["product"], "by_segment": ["segment"],
        "exclusions": ["product", "rule"], "cutoffs": ["product", "bin"]}
"""The groups of each frame of `StrategySums`."""


def merge_sums(parts: Sequence[StrategySums]) -> StrategySums:
    """The sums of the parts' rows taken together (parts of one table: same columns and categories)."""
    merged = {}
    for name, keys in SUM_KEYS.items():
        frames = [getattr(part, name) for part in parts]
        filled = [f for f in frames if len(f)] or frames[:1]
        merged[name] = _group(pd.concat(filled, ignore_index=True), keys)
    return StrategySums(**merged)


def _ratio(numerator: pd.Series, denominator: pd.Series) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (a mean over no rows)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / denominator.where(denominator > 0, 1), np.nan)


def _summary(sums: pd.DataFrame, by: str) -> pd.DataFrame:
    table = pd.DataFrame({
        by: sums[by], "count": sums["count"], "approval_rate": sums["eligible"] / sums["count"],
        "expected_bad_rate": _ratio(sums["approved_pd"], sums["eligible"]),
        "total_limit": sums["total_limit"], "expected_loss": sums["expected_loss"],
        "expected_profit": sums["expected_profit"],
    })
    if "approved_bad" in sums.columns:
        table["realised_bad_rate"] = _ratio(sums["approved_bad"], sums["eligible"])
        table["realised_loss"] = sums["realised_loss"]
        table["realised_profit"] = sums["realised_profit"]
    return table


def summarise(limits: pd.DataFrame, by: str) -> pd.DataFrame:
    """Approval rate, bad rates, EL and profit per value of `by` (grade, product or segment)."""
    return _summary(_sums(limits, by), by)


def _exclusions(sums: pd.DataFrame) -> pd.DataFrame:
    table = sums[["product", "rule", "count"]].assign(mean_pd=sums["pd_sum"] / sums["count"])
    if "defaulted" in sums.columns:
        table["realised_bad_rate"] = sums["defaulted"] / sums["count"]
    table["share"] = table["count"] / table.groupby("product", observed=True)["count"].transform("sum")
    order = {name: i for i, name in enumerate(["eligible", *EXCLUSION_RULES])}
    table = table.sort_values(["product", "rule"], key=lambda c: c.map(order) if c.name == "rule" else c)
    table.insert(2, "meaning", table["rule"].map({"eligible": "eligible", **EXCLUSION_RULES}))
    return table.reset_index(drop=True)


def exclusions(limits: pd.DataFrame) -> pd.DataFrame:
    """Why the approval rate is what it is: per product, the rows each eligibility rule turned away (the
    first rule a row fails, in the order the policy checks them) and the rows left eligible, with their
    share of the product's rows and, on a backtest, their realised bad rate (does the rule keep out risk?)."""
    return _exclusions(_exclusion_sums(limits))


def _curve(sums: StrategySums, points: int) -> pd.DataFrame:
    rows = []
    totals = sums.by_product.set_index("product")["count"]
    for product, bins in sums.cutoffs.groupby("product", observed=True):
        bins = bins.sort_values("bin")
        approved = np.cumsum(bins["approved"].to_numpy())
        wanted = np.maximum(1, np.ceil(np.linspace(0.0, 1.0, points) * approved[-1]))
        taken = np.unique(np.searchsorted(approved, wanted, side="left"))
        cumulative = {c: np.cumsum(bins[c].to_numpy())[taken] for c in bins.columns
                      if c not in ("product", "bin", "pd_max")}
        curve = {
            "product": product,
            "cutoff_pd": bins["pd_max"].to_numpy()[taken],
            "approved": cumulative["approved"],
            "approval_rate": cumulative["approved"] / totals[product],
            "expected_bad_rate": cumulative["pd_sum"] / cumulative["approved"],
            "expected_profit": cumulative["expected_profit"],
        }
        if "defaulted" in cumulative:
            curve["realised_bad_rate"] = cumulative["defaulted"] / cumulative["approved"]
            curve["realised_profit"] = cumulative["realised_profit"]
        rows.append(pd.DataFrame(curve))
    return pd.concat(rows, ignore_index=True)


def cutoff_curve(limits: pd.DataFrame, points: int = 101) -> pd.DataFrame:
    """Per product: approving every eligible row with PD <= cut-off, at `points` cut-offs spread like the PD
    quantiles of its eligible rows.

    Each cut-off is the largest PD of a bin of `PD_GRID` (the bin where the quantile falls), so the rows it
    approves are whole bins, and the figures are cumulative sums over bins: exact, and mergeable across parts.
    """
    return _curve(strategy_sums(limits), points)


def best_cutoffs(curve: pd.DataFrame) -> pd.DataFrame:
    """The profit-maximising cut-off of each product (realised profit when the curve has it)."""
    profit = "realised_profit" if "realised_profit" in curve.columns else "expected_profit"
    return curve.loc[curve.groupby("product", observed=True)[profit].idxmax()].reset_index(drop=True)


@dataclass(frozen=True)
class StrategyTables:
    by_grade: pd.DataFrame
    by_product: pd.DataFrame
    by_segment: pd.DataFrame
    cutoff_curve: pd.DataFrame
    best_cutoffs: pd.DataFrame
    exclusions: pd.DataFrame

    def items(self) -> list[tuple[str, pd.DataFrame]]:
        return list(vars(self).items())


def tables_of(sums: StrategySums, points: int = 101) -> StrategyTables:
    """Every table of the strategy report from the sums of a limits table or backtest (`strategy_sums`, or
    `merge_sums` of its parts')."""
    curve = _curve(sums, points)
    return StrategyTables(
        by_grade=_summary(sums.by_grade, "grade"),
        by_product=_summary(sums.by_product, "product"),
        by_segment=_summary(sums.by_segment, "segment"),
        cutoff_curve=curve,
        best_cutoffs=best_cutoffs(curve),
        exclusions=_exclusions(sums.exclusions),
    )


def strategy_tables(limits: pd.DataFrame) -> StrategyTables:
    """Every table of the strategy report, from a limits table or a backtest."""
    return tables_of(strategy_sums(limits))
