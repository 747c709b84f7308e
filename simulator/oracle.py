"""The truth behind the platform's records, which training never reads: tests and evaluation use it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.schemas import PRODUCTS, TIMESTAMP
from simulator.arrays import strings, table, ts
from simulator.merchants import World

ORACLE_DIR = "oracle"
ORACLE_SCHEMAS: dict[str, pa.Schema] = {
    "loans": pa.schema(
        [
            pa.field("loan_id", pa.int64(), nullable=False),
            pa.field("application_id", pa.int64(), nullable=False),
            pa.field("merchant_id", pa.string(), nullable=False),
            pa.field("product", pa.string(), nullable=False),
            pa.field("true_pd", pa.float64(), nullable=False),
            pa.field("health_at_application", pa.float64(), nullable=False),
            pa.field("defaulted", pa.bool_(), nullable=False),
            pa.field("outcome_complete", pa.bool_(), nullable=False),
            pa.field("dpd90_at", TIMESTAMP, nullable=True),
        ]
    ),
    "merchant_health": pa.schema(
        [
            pa.field("merchant_id", pa.string(), nullable=False),
            pa.field("month", TIMESTAMP, nullable=False),
            pa.field("health", pa.float64(), nullable=False),
        ]
    ),
}
"""`oracle/loans`: the truth behind each loan; `outcome_complete` when its 12-month window lies inside
the simulated window (only then is `defaulted` observable in `loan_performance`); `dpd90_at`, the instant a
defaulter reaches 90 days past due (empty for the others; it may lie after the window end), from which
monitoring measures how many days ahead an alert came."""


def merchant_health(w: World) -> pa.Table:
    merchant = np.repeat(np.arange(w.n), w.months)
    month = np.tile(w.month_start[: w.months], w.n)
    return table(
        ORACLE_SCHEMAS["merchant_health"],
        {
            "merchant_id": strings(merchant, w.merchant_ids),
            "month": ts(month),
            "health": np.round(w.health[:, : w.months].ravel(), 4),
        },
    )


def loan_truth(
    w: World,
    loan_ids: np.ndarray,
    application_ids: np.ndarray,
    merchant: np.ndarray,
    product: np.ndarray,
    true_pd: np.ndarray,
    health: np.ndarray,
    defaulted: np.ndarray,
    outcome_complete: np.ndarray,
    dpd90: pa.Array,
) -> pa.Table:
    return table(
        ORACLE_SCHEMAS["loans"],
        {
            "loan_id": loan_ids,
            "application_id": application_ids,
            "merchant_id": strings(merchant, w.merchant_ids),
            "product": strings(product, PRODUCTS),
            "true_pd": true_pd,
            "health_at_application": health,
            "defaulted": defaulted,
            "outcome_complete": outcome_complete,
            "dpd90_at": dpd90,
        },
    )
