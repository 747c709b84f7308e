"""Limit engine: per merchant and product, eligibility, limit, binding constraint, EL, price and profit.

Everything is column arithmetic on numpy arrays (one pass per product, no row loops), so a million
merchant-product rows take well under a second. The policy supplies every number; this module only
knows how to combine them:

    limit = min(absolute cap, concentration cap, exposure base x advance rate, EL budget / (PD x LGD x CCF))

rounded down to the policy's step. Money is viewed over one year of the facility drawn at EAD:
APR = funding + PD x LGD + operating + margin (the risk-based floor), and
expected profit = EAD x (APR + fees) x (1 - PD) - EL - EAD x (funding + operating).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from core.errors import ScfriskError
from credit.policy import (
    CreditPolicy,
    EligibleReceivables,
    ExposureBase,
    ProductPolicy,
    RevenueCapacity,
    UnsettledOrders,
    WarehouseInventory,
)
from models.master_scale import MasterScale

FEATURES: tuple[str, ...] = (
    "segment",
    "category",
    "tenure_days",
    "net_sales_30d",
    "net_sales_90d",
    "unsettled_order_value",
    "open_receivables_current",
    "receivables_top_counterparty_share",
    "inventory_value_in_warehouse",
)
"""Feature-store columns the engine reads (the feature store guarantees these names)."""

REQUIRED: tuple[str, ...] = ("merchant_id", "pd", *FEATURES)

CONSTRAINTS: tuple[str, ...] = ("absolute_cap", "concentration_cap", "collateral", "el_budget")
"""What can bind a limit, in the order ties are resolved."""

EXCLUSION_RULES: dict[str, str] = {
    "segment": "product not offered to the merchant's segment",
    "tenure": "too short a time selling on the platform",
    "sales": "net sales of the last 90 days below the product's minimum",
    "grade": "risk grade worse than the product accepts",
    "apr_cap": "risk-based rate above the product's cap",
    "min_limit": "qualifying limit below the product's minimum",
}
"""Eligibility rules in the order they are checked (a row reports the first one it fails), each in plain
words for tables that count exclusions; `credit.decision.exclusion_reason` words one row's with its numbers."""

EXCLUSIONS: tuple[str, ...] = tuple(EXCLUSION_RULES)
"""The rule codes: stable, what the limits table's `exclusion_reason` holds."""

LIMIT_COLUMNS: tuple[str, ...] = (
    "merchant_id",
    "product",
    "segment",
    "pd",
    "grade",
    "eligible",
    "exclusion_reason",
    "exposure_base",
    "limit",
    "binding_constraint",
    "ead",
    "expected_loss",
    "apr",
    "expected_profit",
    "policy_version",
)


class LimitInputError(ScfriskError):
    """The merchant table handed to the engine misses columns or holds impossible values."""


def check_input(frame: pd.DataFrame, scale: MasterScale) -> None:
    """Refuse input the engine would silently misprice: missing columns, bad PDs, grades off the scale."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise LimitInputError(f"limit input misses columns {missing}; it needs {list(REQUIRED)}")
    pd_values = frame["pd"].to_numpy(dtype=float)
    bad = ~((pd_values >= 0.0) & (pd_values <= 1.0))
    if bad.any():
        example = frame.loc[bad, ["merchant_id", "pd"]].iloc[0]
        raise LimitInputError(
            f"column 'pd' must lie in [0, 1]: {int(bad.sum())} rows do not, e.g. merchant "
            f"{example['merchant_id']} with pd {example['pd']}"
        )
    if "grade" in frame.columns:
        expected = scale.assign(pd_values)
        off = frame["grade"].astype(str).to_numpy() != expected
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise LimitInputError(
                f"column 'grade' disagrees with the policy master scale on {int(off.sum())} rows, e.g. "
                f"merchant {frame['merchant_id'].iloc[i]}: pd {pd_values[i]:.4f} graded "
                f"{frame['grade'].iloc[i]}, policy says {expected[i]} (PD model and policy out of step?)"
            )


def _columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The engine's inputs as arrays, read once per call rather than once per product and use."""
    text = ("segment", "category")
    numbers = {name: frame[name].to_numpy(dtype=float) for name in ("pd", *FEATURES) if name not in text}
    return {**numbers, **{name: frame[name].to_numpy() for name in text}}


def _amount(columns: Mapping[str, np.ndarray], column: str) -> np.ndarray:
    """A money or share feature as floats; a merchant without that activity has 0, not NaN."""
    return np.nan_to_num(columns[column], nan=0.0)


def exposure_base(columns: Mapping[str, np.ndarray], base: ExposureBase) -> np.ndarray:
    """The collateral (or capacity) value each merchant offers for a product, before the advance rate."""
    match base:
        case UnsettledOrders():
            return _amount(columns, "unsettled_order_value")
        case EligibleReceivables(max_counterparty_share=cap):
            excess = np.clip(_amount(columns, "receivables_top_counterparty_share") - cap, 0.0, 1.0)
            return _amount(columns, "open_receivables_current") * (1.0 - excess)
        case WarehouseInventory(haircuts=haircuts, default_haircut=default):
            categories = list(haircuts)
            codes = pd.Categorical(columns["category"], categories=categories).codes
            cut = np.append(np.array([haircuts[c] for c in categories]), default)[codes]  # code -1: default
            return _amount(columns, "inventory_value_in_warehouse") * (1.0 - cut)
        case RevenueCapacity(months_of_sales=months):
            return months * _amount(columns, "net_sales_90d") / 3.0
    raise AssertionError(f"unhandled exposure base {base!r}")  # pragma: no cover - the union is closed


def apr_floor(pd_values: np.ndarray, terms: ProductPolicy) -> np.ndarray:
    """Risk-based annual rate: what the loan costs to fund, lose, run, plus the margin."""
    p = terms.pricing
    return p.funding_rate + pd_values * terms.lgd + p.operating_rate + p.margin


def expected_profit(
    ead: np.ndarray, apr: np.ndarray, pd_values: np.ndarray, terms: ProductPolicy
) -> np.ndarray:
    """One year of income net of expected loss and costs; `pd_values` may be realised 0/1 defaults."""
    p = terms.pricing
    income = ead * (apr + p.fee_rate) * (1.0 - pd_values)
    return income - pd_values * terms.lgd * ead - ead * (p.funding_rate + p.operating_rate)


def _product_columns(
    columns: Mapping[str, np.ndarray], product: str, policy: CreditPolicy
) -> dict[str, np.ndarray]:
    """The numbers of every merchant (`_columns`) for one product; categoricals as codes (see `_limit_table`)."""
    terms = policy.product(product)
    scale = policy.master_scale
    pd_values = columns["pd"]
    n = len(pd_values)
    grade_index = scale.grade_index(pd_values)
    advance = np.zeros(len(scale.grades))
    advance[: len(terms.advance_rate)] = list(terms.advance_rate.values())

    base = exposure_base(columns, terms.base)
    with np.errstate(divide="ignore", over="ignore"):
        el_cap = terms.el_budget / (pd_values * terms.lgd * terms.ccf)  # PD 0: no EL bound (inf)
    caps = np.stack(
        [
            np.full(n, terms.max_limit),
            terms.max_sales_share * _amount(columns, "net_sales_90d"),
            base * advance[grade_index],
            el_cap,
        ]
    )
    binding = caps.argmin(axis=0)
    raw = caps[binding, np.arange(n)]
    limit = np.floor(raw / terms.round_to) * terms.round_to
    apr = apr_floor(pd_values, terms)

    failed = (
        ~np.isin(columns["segment"], list(terms.segments)),
        ~(columns["tenure_days"] >= terms.min_tenure_days),
        ~(columns["net_sales_90d"] >= terms.min_net_sales_90d),
        grade_index >= len(terms.advance_rate),
        apr > terms.pricing.max_apr,
        limit < max(terms.min_limit, terms.round_to),
    )
    reason = np.full(n, -1, dtype=np.int8)
    for code in reversed(range(len(EXCLUSIONS))):  # the first rule failed wins
        reason[failed[code]] = code
    eligible = reason < 0

    limit = np.where(eligible, limit, 0.0)
    ead = limit * terms.ccf
    return {
        "product": np.full(n, list(policy.products).index(product), dtype=np.int8),
        "pd": pd_values,
        "grade": grade_index,
        "eligible": eligible,
        "exclusion_reason": reason,
        "exposure_base": base,
        "limit": limit,
        "binding_constraint": np.where(eligible, binding, -1).astype(np.int8),
        "ead": ead,
        "expected_loss": pd_values * terms.lgd * ead,
        "apr": np.where(eligible, apr, np.nan),
        "expected_profit": np.where(eligible, expected_profit(ead, apr, pd_values, terms), 0.0),
    }


def _limit_table(frame: pd.DataFrame, parts: list[dict[str, np.ndarray]], policy: CreditPolicy,
                 index: pd.Index) -> pd.DataFrame:
    """The `LIMIT_COLUMNS` frame of the products in `parts` (each over every row of `frame`), stacked in
    that order; built once, so a one-merchant request pays pandas' per-column cost once, not per product."""
    column = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    rows = np.tile(np.arange(len(frame)), len(parts))
    return pd.DataFrame(
        {
            "merchant_id": frame["merchant_id"].array.take(rows),
            "product": pd.Categorical.from_codes(column["product"], categories=list(policy.products)),
            "segment": frame["segment"].array.take(rows),
            "pd": column["pd"],
            "grade": pd.Categorical.from_codes(
                column["grade"], categories=policy.master_scale.names, ordered=True
            ),
            "eligible": column["eligible"],
            "exclusion_reason": pd.Categorical.from_codes(
                column["exclusion_reason"], categories=list(EXCLUSIONS)
            ),
            "exposure_base": column["exposure_base"],
            "limit": column["limit"],
            "binding_constraint": pd.Categorical.from_codes(
                column["binding_constraint"], categories=list(CONSTRAINTS)
            ),
            "ead": column["ead"],
            "expected_loss": column["expected_loss"],
            "apr": column["apr"],
            "expected_profit": column["expected_profit"],
            "policy_version": policy.version,
        },
        index=index,
    )


def product_limits(frame: pd.DataFrame, product: str, policy: CreditPolicy) -> pd.DataFrame:
    """Limits of every row of `frame` for one product (input already checked by `check_input`)."""
    return _limit_table(frame, [_product_columns(_columns(frame), product, policy)], policy, frame.index)


def compute_limits(merchants: pd.DataFrame, policy: CreditPolicy) -> pd.DataFrame:
    """One row per merchant x policy product, products in policy order (see `LIMIT_COLUMNS`)."""
    check_input(merchants, policy.master_scale)
    columns = _columns(merchants)
    parts = [_product_columns(columns, product, policy) for product in policy.products]
    return _limit_table(merchants, parts, policy, pd.RangeIndex(len(merchants) * len(parts)))
