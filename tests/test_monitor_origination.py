"""The monitor keeps each live loan's PD at origination from one day to the next (`pipelines.origination`):
a warm run gives the book and alerts of a cold one, a correction of the raw store that reaches a loan's past
(a re-delivered order of its merchant dated before the application) has that PD computed again, and another
model reuses none of the kept PDs. The staleness rule itself (`features.staleness`) on crafted changed rows."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from core.raw_store import RawStore
from core.settings import Settings
from credit.monitoring import early_warnings
from credit.policy import load_policy
from features.definitions import with_inputs
from features.staleness import stale
from features.training_set import get_training_set
from pipelines.ingest import ingest
from pipelines.monitor import live_loans, loan_book
from pipelines.origination import cached_origination_pd, origination_pd
from testkit.daily import split_day
from testkit.service import POLICY, train_model

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "platform"
DAY = pd.Timestamp("2025-10-15")
MERCHANTS = 300


def test_a_changed_row_reaches_its_merchants_values_after_its_time_only():
    entities = pd.DataFrame({"merchant_id": ["M1", "M1", "M1", "M2"], "as_of": pd.to_datetime(
        ["2025-03-10 12:00:00", "2025-03-10 12:00:01", "2025-09-10 00:00:00", "2025-09-10 00:00:00"])})
    changed = pd.DataFrame({"merchant_id": ["M1"], "first": [pd.Timestamp("2025-03-10 12:00")]})
    orders = with_inputs(["net_sales_90d"])
    assert stale(entities, {"orders": changed}, orders).tolist() == [False, True, True, False]
    # A table these features do not read, or no change at all, reaches nothing.
    assert not stale(entities, {"receivables": changed}, orders).any()
    assert not stale(entities, {}, orders).any()
    # A release is dated after its receipt (validated): a receipt's time bounds the releases it holds.
    releases = with_inputs(["inventory_released_90d"])
    assert stale(entities, {"inventory_receipts": changed}, releases).tolist() == [False, True, True, False]
    # Month-end rows read their loan's principal with no time bound: a loan changed later reaches every time.
    later = changed.assign(first=pd.Timestamp("2025-12-01"))
    assert stale(entities, {"loans": later}, with_inputs(["worst_dpd_365d"])).tolist() == [True, True, True, False]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """The sample's first 300 merchants as known before DAY, ingested."""
    root = tmp_path_factory.mktemp("origination")
    split_day(SAMPLE, DAY, root / "base", root / "day", merchants=MERCHANTS)
    settings = Settings(home=root / "home")
    ingest(root / "base", settings)
    return {"root": root, "settings": settings, "policy": load_policy(POLICY), "model": train_model(seed=7)}


def test_a_warm_monitor_gives_the_cold_ones_book_and_alerts(workspace, tmp_path):
    store = RawStore.from_settings(workspace["settings"])
    model, policy, as_of = workspace["model"], workspace["policy"], DAY.to_pydatetime()
    cold = loan_book(store, model, policy, as_of)
    assert len(cold) > 20
    first = loan_book(store, model, policy, as_of, kept=tmp_path)
    kept = cached_origination_pd(tmp_path, store, model, live_loans(store, as_of))
    assert not kept.computed.any()  # every PD reused
    warm = loan_book(store, model, policy, as_of, kept=tmp_path)
    for book in (first, warm):
        pd.testing.assert_frame_equal(book, cold, check_exact=True)
        pd.testing.assert_frame_equal(early_warnings(book, policy, as_of), early_warnings(cold, policy, as_of))


def test_a_correction_before_an_application_recomputes_the_pds_it_reaches_only(workspace, tmp_path):
    settings, model = workspace["settings"], workspace["model"]
    store = RawStore.from_settings(settings)
    loans = live_loans(store, DAY.to_pydatetime())
    before = cached_origination_pd(tmp_path, store, model, loans)
    assert before.computed.all()

    # Of the merchants with one live loan, the one with the most orders in the 90 days before its application:
    # those orders re-delivered with 100 times their amount.
    orders = f"{workspace['root']}/base/orders.parquet"
    con = duckdb.connect()
    con.register("loans", loans[["loan_id", "merchant_id", "applied_at"]])
    loan_id, merchant, applied = con.execute(f"""
        SELECT l.loan_id, l.merchant_id, l.applied_at FROM loans l JOIN '{orders}' o ON o.merchant_id = l.merchant_id
            AND o.ordered_at < l.applied_at AND o.ordered_at >= l.applied_at - INTERVAL 90 DAY
        WHERE l.merchant_id IN (SELECT merchant_id FROM loans GROUP BY merchant_id HAVING count(*) = 1)
        GROUP BY ALL ORDER BY count(*) DESC, l.loan_id LIMIT 1""").fetchone()
    fix = tmp_path / "correction"
    fix.mkdir()
    con.execute(f"""COPY (SELECT * REPLACE (amount * 100 AS amount) FROM '{orders}'
                          WHERE merchant_id = '{merchant}' AND ordered_at < TIMESTAMP '{applied}'
                          AND ordered_at >= TIMESTAMP '{applied}' - INTERVAL 90 DAY)
                    TO '{fix / "orders.parquet"}' (FORMAT parquet)""")
    ingest(fix, settings)
    store = RawStore.from_settings(settings)

    after = cached_origination_pd(tmp_path, store, model, loans)
    cold = origination_pd(store, model, loans)
    np.testing.assert_array_equal(after.pd, cold)
    target = (loans["loan_id"] == loan_id).to_numpy()
    assert after.pd[target] != before.pd[target]  # the correction moved that loan's PD: a reused one would be wrong
    # Recomputed: that loan's PD alone (its merchant's only loan); every other one reused.
    np.testing.assert_array_equal(after.computed, target)


def test_another_model_reuses_none_of_the_kept_pds(workspace, tmp_path):
    store = RawStore.from_settings(workspace["settings"])
    loans = live_loans(store, DAY.to_pydatetime())
    champion, challenger = workspace["model"], train_model(seed=8)
    kept = cached_origination_pd(tmp_path, store, champion, loans)
    other = cached_origination_pd(tmp_path, store, challenger, loans)
    assert other.computed.all()
    np.testing.assert_array_equal(other.pd, origination_pd(store, challenger, loans))
    assert (other.pd != kept.pd).any()
    assert cached_origination_pd(tmp_path, store, challenger, loans).computed.sum() == 0


def test_a_subset_of_the_features_has_the_values_of_the_whole_query(workspace):
    """The monitor asks the point-in-time query for the features it reads only: derived ones with their inputs."""
    store = RawStore.from_settings(workspace["settings"])
    subset = with_inputs(["complaint_rate_90d", "refund_rate_90d"])
    assert [f.name for f in subset] == ["orders_90d", "refund_rate_90d", "complaints_90d", "complaint_rate_90d"]
    loans = live_loans(store, DAY.to_pydatetime())
    entities = loans[["merchant_id", "applied_at"]].rename(columns={"applied_at": "as_of"})
    part = get_training_set(entities, store, features=subset)
    whole = get_training_set(entities, store)
    assert list(part.columns) == ["merchant_id", "as_of", *(f.name for f in subset)]
    pd.testing.assert_frame_equal(part, whole[list(part.columns)], check_exact=True)
