"""Point-in-time correctness of the features on a hand-made platform with facts around as_of.

Merchant M1 has, for every feature family, one fact just before as_of and one at or after it (a refund,
a rating, a complaint, a payment, a release, a days-past-due observation, an order at exactly as_of).
A leak of any of them changes an asserted value. M2 has no facts at all (null semantics).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from core.errors import ScfriskError
from features.definitions import FEATURES, format_value
from features.labels import application_outcomes
from features.training_set import get_training_set
from tests.rawdata import write_raw_store

T = pd.Timestamp("2024-07-01")


def d(days: float, hours: float = 0) -> pd.Timestamp:
    """A time `days` days before T (negative: after)."""
    return T - pd.Timedelta(days=days) + pd.Timedelta(hours=hours)


def order(oid, buyer, at, amount, promised, shipped=None, delivered=None, cancelled=None, refunded=None,
          rating=None, rated=None, settled=None):
    return dict(order_id=oid, merchant_id="M1", buyer_id=buyer, ordered_at=at, amount=amount, status="paid",
                promised_delivery_at=promised, shipped_at=shipped, delivered_at=delivered,
                cancelled_at=cancelled, refunded_at=refunded, rating=rating, rated_at=rated, settled_at=settled)


TABLES = {
    "merchants": [
        dict(merchant_id="M1", merchant_type="corporate", category="apparel", region="east",
             onboarded_at=pd.Timestamp("2023-01-01"), registered_capital=1e6),
        dict(merchant_id="M2", merchant_type="individual", category="toys", region="west",
             onboarded_at=d(30), registered_capital=None),
        dict(merchant_id="M3", merchant_type="individual", category="food", region="north",
             onboarded_at=pd.Timestamp("2022-01-01"), registered_capital=None),
    ],
    "orders": [
        order(1, 1, d(10), 100.0, d(5), d(9), d(6), rating=5, rated=d(4), settled=d(2)),
        order(2, 2, d(20), 200.0, d(15), d(19), d(13), refunded=d(-3), rating=1, rated=d(-1)),
        order(3, 3, T, 1000.0, d(-5)),  # exactly at as_of: unknown
        order(4, 1, d(30), 50.0, d(25), d(29), d(26), refunded=d(20), rating=2, rated=d(24)),
        order(5, 2, d(30) - pd.Timedelta(seconds=1), 70.0, d(25), cancelled=d(30, 1)),
        order(6, 1, d(60), 400.0, d(55), d(50), d(-2)),  # delivered after as_of: late at as_of
    ],
    "behaviour_events": [
        dict(event_id=1, merchant_id="M1", event_at=d(5), event_type="complaint"),
        dict(event_id=2, merchant_id="M1", event_at=T, event_type="complaint"),
        dict(event_id=3, merchant_id="M1", event_at=d(-1), event_type="complaint"),
        dict(event_id=4, merchant_id="M1", event_at=d(3, 8), event_type="login"),
        dict(event_id=5, merchant_id="M1", event_at=d(3, 10), event_type="login"),
        dict(event_id=6, merchant_id="M1", event_at=d(40), event_type="login"),
        dict(event_id=7, merchant_id="M1", event_at=d(-1), event_type="login"),
        dict(event_id=8, merchant_id="M1", event_at=d(10), event_type="cs_response", value=30.0),
        dict(event_id=9, merchant_id="M1", event_at=d(-1), event_type="cs_response", value=90.0),
    ],
    "inventory_receipts": [
        dict(receipt_id=1, merchant_id="M1", warehouse_id="W1", category="apparel", quantity=10,
             appraised_value=1000.0, received_at=d(100), released_at=d(-10)),
        dict(receipt_id=2, merchant_id="M1", warehouse_id="W1", category="apparel", quantity=5,
             appraised_value=500.0, received_at=d(50), released_at=d(20)),
        dict(receipt_id=3, merchant_id="M1", warehouse_id="W2", category="apparel", quantity=3,
             appraised_value=300.0, received_at=T),
    ],
    "receivables": [
        dict(receivable_id=1, merchant_id="M1", counterparty_id="A", amount=300.0, issued_at=d(40),
             due_at=d(-20), paid_at=d(-5)),
        dict(receivable_id=2, merchant_id="M1", counterparty_id="B", amount=100.0, issued_at=d(60),
             due_at=d(30)),
        dict(receivable_id=3, merchant_id="M1", counterparty_id="A", amount=200.0, issued_at=d(80),
             due_at=d(50), paid_at=d(55)),
        dict(receivable_id=4, merchant_id="M1", counterparty_id="B", amount=50.0, issued_at=d(10),
             due_at=d(-30)),
    ],
    "loan_applications": [
        dict(application_id=1, merchant_id="M1", product="microloan", requested_amount=1000.0, applied_at=d(200)),
        dict(application_id=2, merchant_id="M1", product="microloan", requested_amount=2000.0, applied_at=T),
        dict(application_id=3, merchant_id="M3", product="order_financing", requested_amount=500.0,
             applied_at=pd.Timestamp("2023-01-01")),
    ],
    "loans": [
        dict(loan_id=1, application_id=1, merchant_id="M1", product="microloan", principal=1000.0,
             annual_rate=0.12, disbursed_at=d(195), maturity_at=d(15)),
        dict(loan_id=2, application_id=3, merchant_id="M3", product="order_financing", principal=500.0,
             annual_rate=0.1, disbursed_at=pd.Timestamp("2023-01-05"), maturity_at=pd.Timestamp("2023-04-05")),
    ],
    "loan_performance": [
        *[
            dict(record_id=i, loan_id=1, merchant_id="M1", observed_at=d(age), days_past_due=dpd, outstanding=out)
            for i, (age, dpd, out) in enumerate(
                [(165, 0, 900.0), (135, 35, 800.0), (105, 0, 500.0), (15, 10, 400.0), (0, 95, 500.0),
                 (-30, 120, 500.0)]
            )
        ],
        dict(record_id=10, loan_id=2, merchant_id="M3", observed_at=pd.Timestamp("2023-02-01"),
             days_past_due=0, outstanding=300.0),
        dict(record_id=11, loan_id=2, merchant_id="M3", observed_at=d(-30), days_past_due=100, outstanding=300.0),
    ],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_raw_store(tmp_path_factory.mktemp("raw"), TABLES)


@pytest.fixture(scope="module")
def training(store) -> pd.DataFrame:
    entities = pd.DataFrame(
        {"merchant_id": ["M1", "M2", "M1"], "as_of": [T, T, T], "label": [1, 0, 1], "application_id": [2, 7, 9]}
    )
    return get_training_set(entities, store)


@pytest.fixture(scope="module")
def m1(training) -> pd.Series:
    return training.iloc[0]


def test_entity_rows_and_extra_columns_pass_through(training):
    assert list(training["application_id"]) == [2, 7, 9]
    assert list(training["label"]) == [1, 0, 1]
    assert list(training.columns[:4]) == ["merchant_id", "as_of", "label", "application_id"]
    assert list(training.columns[4:]) == [f.name for f in FEATURES]
    pd.testing.assert_series_equal(training.iloc[0, 4:], training.iloc[2, 4:], check_names=False)


EXPECTED_M1 = {
    # sales: order 2 refunded after as_of counts as sold; order 3 at exactly as_of is unknown
    "net_sales_30d": 300.0,
    "net_sales_90d": 700.0,
    "orders_30d": 3.0,
    "unsettled_order_value": 600.0,
    # window edge: order 4 exactly 30 days before as_of is in, order 5 one second earlier is out
    "gmv_30d": 350.0,
    "gmv_90d": 820.0,
    "weeks_without_sales_12w": 9.0,
    # quality: the late refund and the late 1-star rating are unknown at as_of
    "refund_rate_90d": 0.2,
    "cancellation_rate_30d": 0.0,
    "cancellation_rate_90d": 0.2,
    "late_delivery_rate_90d": 0.5,
    "avg_rating_90d": 3.5,
    "low_rating_share_90d": 0.5,
    "complaints_90d": 1.0,
    "complaint_rate_90d": 0.2,
    # customer base: the buyer of the order at as_of is unknown
    "unique_buyers_90d": 2.0,
    "repeat_buyer_share_365d": 1.0,
    "top_buyer_share_90d": 550 / 820,
    "buyer_concentration_hhi_90d": (550**2 + 270**2) / 820**2,
    # operations
    "days_since_last_order": 10.0,
    "active_days_30d": 3.0,
    "logins_30d": 2.0,
    "login_days_30d": 1.0,
    "days_since_last_login": 2 + 14 / 24,
    "cs_response_minutes_90d": 30.0,
    # inventory: receipt 1 released after as_of is still in the warehouse; receipt 3 at as_of unknown
    "inventory_value_in_warehouse": 1000.0,
    "open_warehouse_receipts": 1.0,
    "inventory_released_90d": 500.0,
    "inventory_turnover_90d": 0.5,
    "days_of_inventory": 1000 / (700 / 90),
    # receivables: receivable 1 paid after as_of is open and not yet due
    "open_receivables_current": 350.0,
    "open_receivables_total": 450.0,
    "overdue_receivables": 100.0,
    "receivables_overdue_share": 100 / 450,
    "receivables_top_counterparty_share": 300 / 450,
    "days_sales_outstanding": 450 / (650 / 90),
    "receivables_late_share_365d": 0.5,
    "avg_days_to_collect_180d": 25.0,
    # credit: the 95 dpd observed at as_of and 120 after are unknown; the application at as_of too
    "prior_applications_365d": 1.0,
    "prior_loans": 1.0,
    "worst_dpd_ever": 35.0,
    "recent_dpd": 10.0,
    "credit_utilisation": 0.4,
    "months_since_last_delinquency": 15 / 30.4375,
    "delinquent_months_365d": 2.0,
    # profile
    "tenure_days": float((T - pd.Timestamp("2023-01-01")).days),
}


@pytest.mark.parametrize("name", EXPECTED_M1)
def test_features_use_only_facts_strictly_before_as_of(m1, name):
    assert m1[name] == pytest.approx(EXPECTED_M1[name]), name


def test_profile_features(m1):
    assert (m1["segment"], m1["category"], m1["region"]) == ("corporate", "apparel", "east")


def test_undefined_values_are_null_and_empty_sums_are_zero(training):
    m2 = training.iloc[1]
    for name in ("net_sales_30d", "orders_30d", "inventory_value_in_warehouse", "open_receivables_current",
                 "prior_loans", "unique_buyers_90d", "complaints_90d"):
        assert m2[name] == 0.0, name
    assert m2["weeks_without_sales_12w"] == 12.0
    for name in ("cancellation_rate_30d", "refund_rate_90d", "avg_rating_90d", "top_buyer_share_90d",
                 "days_since_last_order", "sales_growth_30d", "complaint_rate_90d", "inventory_turnover_90d",
                 "days_sales_outstanding", "worst_dpd_ever", "registered_capital", "weekly_sales_volatility_12w"):
        assert math.isnan(m2[name]), name
    assert m2["tenure_days"] == 30.0


def test_batches_of_merchants_give_the_same_rows(store, training):
    entities = training[["merchant_id", "as_of", "label", "application_id"]]
    pd.testing.assert_frame_equal(get_training_set(entities, store, batch_rows=1), training)


def test_later_as_of_sees_the_later_facts(store):
    later = get_training_set(pd.DataFrame({"merchant_id": ["M1"], "as_of": [d(-40)]}), store).iloc[0]
    assert later["inventory_value_in_warehouse"] == 300.0  # receipt 1 released, receipt 3 arrived
    assert later["worst_dpd_ever"] == 120.0
    assert later["complaints_90d"] == 3.0


def test_application_outcomes_label_within_horizon(store):
    out = application_outcomes(store, horizon_months=12).set_index("application_id")
    assert list(out.index) == [3, 1]
    assert out.loc[1, "defaulted"] == 1 and not out.loc[1, "outcome_complete"]
    assert out.loc[3, "defaulted"] == 0 and out.loc[3, "outcome_complete"]  # 100 dpd came after 12 months
    assert out.loc[1, "as_of"] == d(200) and out.loc[1, "principal"] == 1000.0


def test_entity_frame_errors_name_the_problem(store):
    with pytest.raises(ScfriskError, match="as_of"):
        get_training_set(pd.DataFrame({"merchant_id": ["M1"]}), store)
    with pytest.raises(ScfriskError, match="feature column.*net_sales_30d"):
        get_training_set(pd.DataFrame({"merchant_id": ["M1"], "as_of": [T], "net_sales_30d": [1]}), store)


def test_reason_code_formatting_and_constraints():
    assert format_value(0.18, "ratio") == "18%"
    assert format_value(12345.6, "CNY") == "CNY 12,346"
    assert format_value(float("nan"), "days") == "unknown"
    assert [format_value(v, "days") for v in (1.2, 0.6, 11.0)] == ["1 day", "1 day", "11 days"]
    assert format_value(1, "months") == "1 month"
    assert len(FEATURES) >= 60


def test_feature_set_version_follows_what_computes_values_not_their_wording(monkeypatch):
    import dataclasses

    from features import definitions

    before = definitions.feature_set_version()
    first = definitions.FEATURES[0]
    reworded = dataclasses.replace(first, description="said another way", unit="count", direction=-first.direction)
    monkeypatch.setattr(definitions, "FEATURES", (reworded, *definitions.FEATURES[1:]))
    assert definitions.feature_set_version() == before
    recomputed = dataclasses.replace(first, window_days=(first.window_days or 30) + 1)
    monkeypatch.setattr(definitions, "FEATURES", (recomputed, *definitions.FEATURES[1:]))
    assert definitions.feature_set_version() != before
