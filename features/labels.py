"""The default label of each loan: 90+ days past due within the horizon after disbursement.

One row per loan with the application it was granted on; `as_of` is the application time, so joining
features on it gives the information the lender had when deciding.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pandas as pd

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.sql import fetch_one
from features.training_set import table_readers

DEFAULT_DPD = 90


def last_observation(raw_store: RawStore) -> datetime | None:
    """The store's last repayment observation: a loan's outcome is complete once its horizon ends by then
    (one instant for every merchant, so it is taken over the whole store, not per bucket)."""
    con = raw_store.connect()
    performance = table_readers(raw_store, con, ["loan_performance"])["loan_performance"]
    return fetch_one(con, f"SELECT max(observed_at) FROM {performance}")[0]


def application_outcomes(raw_store: RawStore, horizon_months: int = 12, buckets: Sequence[int] | None = None,
                         observed_until: datetime | None = None) -> pd.DataFrame:
    """Loans with `defaulted` (90+ dpd observed within the horizon) and `outcome_complete` (the
    horizon has fully elapsed by the store's last observation, so a 0 is a real non-default).

    `buckets`: the loans of those merchant buckets only, complete as of `observed_until` (default: the
    store's `last_observation`)."""
    if not 1 <= int(horizon_months) <= 120:
        raise ScfriskError(f"label horizon must be 1-120 months, got {horizon_months}")
    if observed_until is None:
        observed_until = last_observation(raw_store)
    con = raw_store.connect()
    t = table_readers(raw_store, con, ["loan_applications", "loans", "loan_performance"], buckets)
    horizon = f"INTERVAL {int(horizon_months)} MONTH"
    sql = f"""
        SELECT a.application_id, l.loan_id, a.merchant_id, a.applied_at AS as_of, a.product,
               a.requested_amount, l.principal, l.disbursed_at,
               coalesce(max((p.days_past_due >= {DEFAULT_DPD})::INT)
                        FILTER (WHERE p.observed_at <= l.disbursed_at + {horizon}), 0) AS defaulted,
               l.disbursed_at + {horizon} <= ?::TIMESTAMP AS outcome_complete
        FROM {t['loan_applications']} a
        JOIN {t['loans']} l ON l.application_id = a.application_id
        LEFT JOIN {t['loan_performance']} p ON p.loan_id = l.loan_id
        GROUP BY ALL
        ORDER BY as_of, application_id
    """
    out = con.execute(sql, [observed_until]).df()
    out["outcome_complete"] = out["outcome_complete"].fillna(False).astype(bool)
    return out
