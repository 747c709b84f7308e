"""Strategy analytics for risk officers: what a policy approves, loses and earns, and where to cut off.

Works on limits tables (`credit.limits`): the current book (expected figures only) or an out-of-time
backtest, where realised defaults turn expected loss and profit into realised ones. Tables are pure
functions; `reporting.strategy_report` renders them for risk officers.
"""

from __future__ import annotations

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


def summarise(limits: pd.DataFrame, by: str) -> pd.DataFrame:
    """Approval rate, bad rates, EL and profit per value of `by` (grade, product or segment)."""
    frame = limits.assign(
        approved_pd=limits["pd"].where(limits["eligible"]),
        approved_limit=limits["limit"].where(limits["eligible"]),
    )
    aggregations = {
        "count": ("eligible", "size"),
        "approval_rate": ("eligible", "mean"),
        "expected_bad_rate": ("approved_pd", "mean"),
        "total_limit": ("limit", "sum"),
        "expected_loss": ("expected_loss", "sum"),
        "expected_profit": ("expected_profit", "sum"),
    }
    if "defaulted" in frame.columns:
        frame["approved_bad"] = frame["defaulted"].where(frame["eligible"])
        aggregations |= {
            "realised_bad_rate": ("approved_bad", "mean"),
            "realised_loss": ("realised_loss", "sum"),
            "realised_profit": ("realised_profit", "sum"),
        }
    return frame.groupby(by, observed=True).agg(**aggregations).reset_index()


def exclusions(limits: pd.DataFrame) -> pd.DataFrame:
    """Why the approval rate is what it is: per product, the rows each eligibility rule turned away (the
    first rule a row fails, in the order the policy checks them) and the rows left eligible, with their
    share of the product's rows and, on a backtest, their realised bad rate (does the rule keep out risk?)."""
    rule = limits["exclusion_reason"].astype(object).where(~limits["eligible"], "eligible").astype(str)
    frame = limits.assign(rule=rule)
    aggregations: dict[str, tuple[str, str]] = {"count": ("eligible", "size"), "mean_pd": ("pd", "mean")}
    if "defaulted" in frame.columns:
        aggregations["realised_bad_rate"] = ("defaulted", "mean")
    table = frame.groupby(["product", "rule"], observed=True).agg(**aggregations).reset_index()
    table["share"] = table["count"] / table.groupby("product", observed=True)["count"].transform("sum")
    order = {name: i for i, name in enumerate(["eligible", *EXCLUSION_RULES])}
    table = table.sort_values(["product", "rule"], key=lambda c: c.map(order) if c.name == "rule" else c)
    table.insert(2, "meaning", table["rule"].map({"eligible": "eligible", **EXCLUSION_RULES}))
    return table.reset_index(drop=True)


def cutoff_curve(limits: pd.DataFrame, points: int = 101) -> pd.DataFrame:
    """Per product: approving every eligible row with PD <= cut-off, at `points` PD quantiles.

    Cumulative sums over rows sorted by PD give every cut-off in one pass.
    """
    realised = "defaulted" in limits.columns
    rows = []
    for product, group in limits.groupby("product", observed=True):
        eligible = group[group["eligible"]].sort_values("pd")
        if eligible.empty:
            continue
        pd_sorted = eligible["pd"].to_numpy()
        cutoffs = np.unique(np.quantile(pd_sorted, np.linspace(0.0, 1.0, points)))
        taken = np.searchsorted(pd_sorted, cutoffs, side="right")
        curve = {
            "product": product,
            "cutoff_pd": cutoffs,
            "approved": taken,
            "approval_rate": taken / len(group),
            "expected_bad_rate": np.cumsum(pd_sorted)[taken - 1] / taken,
            "expected_profit": np.cumsum(eligible["expected_profit"].to_numpy())[taken - 1],
        }
        if realised:
            curve["realised_bad_rate"] = np.cumsum(eligible["defaulted"].to_numpy())[taken - 1] / taken
            curve["realised_profit"] = np.cumsum(eligible["realised_profit"].to_numpy())[taken - 1]
        rows.append(pd.DataFrame(curve))
    return pd.concat(rows, ignore_index=True)


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


def strategy_tables(limits: pd.DataFrame) -> StrategyTables:
    """Every table of the strategy report, from a limits table or a backtest."""
    curve = cutoff_curve(limits)
    return StrategyTables(
        by_grade=summarise(limits, "grade"),
        by_product=summarise(limits, "product"),
        by_segment=summarise(limits, "segment"),
        cutoff_curve=curve,
        best_cutoffs=best_cutoffs(curve),
        exclusions=exclusions(limits),
    )
