"""The default label of each loan: 90+ days past due within the horizon after disbursement.

One row per loan with the application it was granted on; `as_of` is the application time, so joining
features on it gives the information the lender had when deciding.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from core.errors import ScfriskError
from core.raw_store import RawStore
from features.training_set import table_readers

DEFAULT_DPD = 90


def application_outcomes(raw_store: RawStore, horizon_months: int = 12) -> pd.DataFrame:
    """Loans with `defaulted` (90+ dpd observed within the horizon) and `outcome_complete` (the
    horizon has fully elapsed by the store's last observation, so a 0 is a real non-default)."""
    if not 1 <= int(horizon_months) <= 120:
        raise ScfriskError(f"label horizon must be 1-120 months, got {horizon_months}")
    con = duckdb.connect()
    t = table_readers(raw_store, con, ["loan_applications", "loans", "loan_performance"])
    horizon = f"INTERVAL {int(horizon_months)} MONTH"
    sql = f"""
        SELECT a.application_id, l.loan_id, a.merchant_id, a.applied_at AS as_of, a.product,
               a.requested_amount, l.principal, l.disbursed_at,
               coalesce(max((p.days_past_due >= {DEFAULT_DPD})::INT)
                        FILTER (WHERE p.observed_at <= l.disbursed_at + {horizon}), 0) AS defaulted,
               l.disbursed_at + {horizon} <= (SELECT max(observed_at) FROM {t['loan_performance']})
                   AS outcome_complete
        FROM {t['loan_applications']} a
        JOIN {t['loans']} l ON l.application_id = a.application_id
        LEFT JOIN {t['loan_performance']} p ON p.loan_id = l.loan_id
        GROUP BY ALL
        ORDER BY as_of, application_id
    """
    out = con.execute(sql).df()
    out["outcome_complete"] = out["outcome_complete"].fillna(False).astype(bool)
    return out
