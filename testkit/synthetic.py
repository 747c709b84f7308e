"""Synthetic inputs with known truth, for tests and benchmarks: a labelled application table with a true
PD (training code) and merchants with a PD and the limit engine's features (limits code).

It has what real feature tables have -- monotone and non-linear effects, an interaction, categoricals,
missing values, -999 sentinels, text-coded numbers, drift over time -- and the true PD of every row, so a
model's gap to the best achievable AUC and Brier can be measured.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DIRECTIONS = {"months_on_platform": -1, "gmv_90d_log": -1, "refund_rate_90d": 1, "late_settlement_share": 1,
              "complaints_90d": 1, "rating_avg": -1, "gmv_growth": 0}
"""Expected sign of each numeric feature's effect on PD (what `features.definitions` will declare)."""


def synthetic_applications(n: int, seed: int, months: int = 24, start: str = "2024-01-01") -> pd.DataFrame:
    """One row per application: id, date, segment, product, features, `defaulted` and the `true_pd`."""
    rng = np.random.default_rng(seed)
    applied_at = pd.Timestamp(start) + pd.to_timedelta(rng.uniform(0, months * 30.4, n), unit="D")
    drift = (applied_at - applied_at.min()).days.to_numpy() / (months * 30.4)
    merchant_type = rng.choice(["corporate", "individual"], n, p=[0.35, 0.65])
    product = rng.choice(["order_financing", "receivable_financing", "warehouse_receipt_financing", "microloan"],
                         n, p=[0.4, 0.25, 0.1, 0.25])
    region = rng.choice(["east", "north", "south", "west", "central"], n)
    category = rng.choice(["apparel", "electronics", "home", "beauty", "food", "sports", "toys", "auto_parts"], n)
    months_on = rng.gamma(2.0, 12.0, n)
    gmv = rng.normal(10 + 0.8 * (merchant_type == "corporate"), 1.2, n) + 0.3 * drift
    refund = rng.beta(2, 30, n) + 0.02 * drift
    late = rng.beta(1, 12, n)
    complaints = rng.poisson(np.exp(0.5 + 0.8 * refund * 10) / 4)
    rating = np.clip(rng.normal(4.5 - 3 * refund, 0.3, n), 1, 5)
    growth = rng.normal(0, 0.3, n)
    logit = (-4.6 + 1.4 * (months_on < 6) - 0.3 * np.log1p(months_on / 6) - 0.5 * np.tanh(gmv - 10)
             + 1.2 * (refund > 0.1) + 8 * refund + 2.0 * (late > 0.25) + 0.2 * np.minimum(complaints, 6)
             - 0.8 * (rating - 4.5) * (rating < 4.5) + 1.2 * growth ** 2
             + 0.5 * (merchant_type == "individual") + 0.6 * (product == "microloan")
             - 0.5 * (product == "receivable_financing") + 0.4 * np.isin(category, ["electronics", "toys"])
             + 0.8 * (refund > 0.1) * (merchant_type == "individual"))
    true_pd = 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame({
        "application_id": [f"app-{i:07d}" for i in range(n)],
        "applied_at": applied_at.to_numpy(),
        "merchant_type": merchant_type,
        "product": product,
        "region": region,
        "category": category,
        "months_on_platform": months_on,
        "gmv_90d_log": gmv,
        "refund_rate_90d": refund,
        "late_settlement_share": late,
        "complaints_90d": complaints,
        "rating_avg": rating,
        "gmv_growth": growth,
        "defaulted": rng.binomial(1, true_pd),
        "true_pd": true_pd,
    })
    frame.loc[rng.random(n) < 0.05, "rating_avg"] = np.nan
    frame.loc[rng.random(n) < 0.03, "late_settlement_share"] = -999.0
    frame.loc[rng.random(n) < 0.02, "region"] = None
    return frame.sort_values("applied_at", ignore_index=True)


def limit_inputs(n: int, seed: int = 0) -> pd.DataFrame:
    """`n` merchants with a PD and every feature the limit engine reads (exposure bases, segment, tenure)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "merchant_id": [f"M{i:07d}" for i in range(n)],
            "pd": rng.beta(1.0, 25.0, n),
            "segment": rng.choice(["corporate", "individual"], n),
            "category": rng.choice(["apparel", "electronics", "food", "toys"], n),
            "tenure_days": rng.integers(0, 2000, n),
            "net_sales_30d": rng.lognormal(9.0, 1.0, n),
            "net_sales_90d": rng.lognormal(10.0, 1.0, n),
            "unsettled_order_value": rng.lognormal(8.0, 1.0, n),
            "open_receivables_current": rng.lognormal(9.0, 1.0, n),
            "receivables_top_counterparty_share": rng.uniform(0.0, 1.0, n),
            "inventory_value_in_warehouse": rng.lognormal(9.0, 1.5, n),
        }
    )
