"""Early warning (`credit.monitoring`): the policy's [monitoring] tables validated on load, each signal on
a crafted loan and not on a quiet one, and what freezes, cuts and escalations do to a decision."""

from __future__ import annotations

import copy
import json
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from core.files import read_toml
from credit.decision import CreditRequest, Outcome, decide_row
from credit.monitoring import apply_effect, baseline_column, early_warnings, limit_effects
from credit.policy import PolicyError, parse_policy
from testkit.service import POLICY

AS_OF = datetime(2025, 6, 1)
DATA = read_toml(POLICY, PolicyError, "policy file")
POLICY_ = parse_policy(DATA)


def _with(change) -> dict:
    data = copy.deepcopy(DATA)
    change(data["monitoring"])
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["sales_drop"].update(action="cut"),
     "'monitoring.sales_drop.cut_share': required when action is 'cut'"),
    (lambda m: m["pd_migration"].update(cut_share=0.3), "'monitoring.pd_migration.cut_share': only a 'cut' takes"),
    (lambda m: m["refund_spike"].update(feature="refund_rate_7d"),
     "'monitoring.refund_spike.feature': 'refund_rate_7d' is not a numeric feature of the catalogue"),
    (lambda m: m["refund_spike"].update(feature="category"), "'category' is not a numeric feature"),
    (lambda m: m["days_past_due"].update(action="shout"), "'monitoring.days_past_due.action'"),
    (lambda m: m["margin_call"].update(max_ltv=-1), "'monitoring.margin_call.max_ltv'"),
    (lambda m: m.update(early_bird={"action": "watch"}), "unknown key 'monitoring.early_bird'"),
    (lambda m: m["sales_drop"].update(action="cut", cut_share=1.5), "'monitoring.sales_drop.cut_share'"),
])
def test_monitoring_policy_is_validated_on_load_with_the_key_named(change, message):
    with pytest.raises(PolicyError, match="invalid credit policy") as info:
        parse_policy(_with(change))
    assert message in str(info.value)


def test_a_signal_left_out_or_disabled_does_not_run():
    data = _with(lambda m: (m.pop("sales_drop"), m["days_past_due"].update(enabled=False)))
    signals = parse_policy(data).monitoring.signals()
    assert "sales_drop" not in signals and "days_past_due" not in signals and "pd_migration" in signals


QUIET = {
    "loan_id": 1, "merchant_id": "M1", "product": "order_financing", "principal": 1000.0,
    "disbursed_at": pd.Timestamp("2025-04-10"), "outstanding": 1000.0, "days_past_due": 0,
    "observed_at": pd.Timestamp("2025-05-31 23:59:59.999999"), "pd_now": 0.012, "pd_origination": 0.010,
    "category": "home", "net_sales_30d": 1000.0, "net_sales_365d": 12_000.0, "overdue_receivables": 0.0,
    "receivables_overdue_share": 0.0, "warehouse_value_at_disbursement": 5000.0, "warehouse_value_now": 4800.0,
    "financed_receivables": 4000.0, "financed_overdue": 0.0, "financed_oldest_overdue_days": 0,
    "refund_rate_90d": 0.03, baseline_column("refund_rate_90d", 90): 0.03,
    "complaint_rate_90d": 0.01, baseline_column("complaint_rate_90d", 90): 0.01,
    "late_delivery_rate_30d": 0.05, baseline_column("late_delivery_rate_30d", 90): 0.05,
}
CRAFTED = {
    "pd_migration": {"pd_now": 0.17, "pd_origination": 0.009},  # B -> G, 18.9x
    "sales_drop": {"net_sales_30d": 150.0},  # 15% of the 1,000 monthly level
    "refund_spike": {"refund_rate_90d": 0.35},
    "complaint_spike": {"complaint_rate_90d": 0.32},
    "shipping_delay": {"late_delivery_rate_30d": 0.60},
    "overdue_receivables": {"overdue_receivables": 6000.0, "receivables_overdue_share": 0.6},
    "days_past_due": {"days_past_due": 12},
    "collateral_released": {"product": "warehouse_receipt_financing", "warehouse_value_now": 500.0,
                            "outstanding": 100.0},
    "margin_call": {"product": "warehouse_receipt_financing", "outstanding": 4500.0},  # 4500 / (4800 x 0.8)
    "financed_receivable_overdue": {"product": "receivable_financing", "financed_overdue": 1200.0,
                                    "financed_oldest_overdue_days": 20},
}


def _book(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame([{**QUIET, "loan_id": i + 1, **row} for i, row in enumerate(rows)])


def test_quiet_loans_raise_no_alert_on_any_product():
    products = [{"product": p} for p in POLICY_.products]
    alerts = early_warnings(_book(*products), POLICY_, AS_OF)
    assert alerts.empty and list(alerts.columns)[:3] == ["as_of", "loan_id", "merchant_id"]


@pytest.mark.parametrize("signal", list(CRAFTED))
def test_each_signal_fires_on_its_crafted_loan_alone(signal):
    alerts = early_warnings(_book(QUIET, CRAFTED[signal]), POLICY_, AS_OF)
    assert alerts["signal"].tolist() == [signal] and alerts["loan_id"].tolist() == [2]
    config = POLICY_.monitoring.signals()[signal]
    assert alerts["action"].iloc[0] == config.action
    evidence = json.loads(alerts["evidence"].iloc[0])
    assert evidence and all(v is None or isinstance(v, (int, float, str)) for v in evidence.values())
    assert len(alerts["reason"].iloc[0]) > 30


def test_evidence_and_reasons_carry_the_figures():
    alerts = early_warnings(_book(CRAFTED["pd_migration"], CRAFTED["margin_call"], CRAFTED["sales_drop"]),
                            POLICY_, AS_OF).set_index("signal")
    assert json.loads(alerts.loc["pd_migration", "evidence"]) == {
        "pd_now": 0.17, "pd_origination": 0.009, "grade_now": "G", "grade_origination": "B"}
    assert "from 0.90% (grade B) at origination to 17.00% (grade G) now, 5 grades worse" in alerts.loc[
        "pd_migration", "reason"]
    margin = json.loads(alerts.loc["margin_call", "evidence"])
    assert margin["haircut"] == 0.20 and margin["ltv"] == pytest.approx(4500 / (4800 * 0.8))
    assert "above the 90% maximum loan to value" in alerts.loc["margin_call", "reason"]
    assert "15% of the merchant's own monthly level" in alerts.loc["sales_drop", "reason"]
    assert alerts.loc["pd_migration", "action"] == "escalate" and np.isnan(alerts.loc["pd_migration", "cut_share"])


def test_a_migration_to_a_pd_below_the_floor_or_a_rate_below_its_floor_is_quiet():
    low = {"pd_now": 0.09, "pd_origination": 0.009}  # B -> F: 10x, 4 grades, but under min_pd_now 16%
    floor = {"refund_rate_90d": 0.25, baseline_column("refund_rate_90d", 90): 0.01}  # 25x, under 30%
    steady = {"complaint_rate_90d": 0.40, baseline_column("complaint_rate_90d", 90): 0.30}  # 1.3x, under 2x
    assert early_warnings(_book(low, floor, steady), POLICY_, AS_OF).empty


def test_a_cut_signal_carries_its_share():
    data = _with(lambda m: m["sales_drop"].update(action="cut", cut_share=0.4))
    alerts = early_warnings(_book(CRAFTED["sales_drop"]), parse_policy(data), AS_OF)
    assert alerts["action"].tolist() == ["cut"] and alerts["cut_share"].tolist() == [0.4]


def test_a_book_missing_a_column_is_refused():
    with pytest.raises(ValueError, match=r"misses columns \['pd_origination'\]"):
        early_warnings(_book(QUIET).drop(columns="pd_origination"), POLICY_, AS_OF)


def _limit_row(product: str = "microloan", limit: float = 5000.0) -> dict:
    return {"merchant_id": "M1", "product": product, "pd": 0.01, "grade": "B", "eligible": True, "limit": limit,
            "binding_constraint": "concentration_cap", "apr": 0.15, "ead": limit, "expected_loss": 10.0,
            "exclusion_reason": None, "exposure_base": 9000.0}


def _alerts(*actions: tuple[str, float | None]) -> pd.DataFrame:
    return pd.DataFrame({"as_of": pd.Timestamp(AS_OF), "loan_id": range(len(actions)), "merchant_id": "M1",
                         "product": "microloan", "signal": "sales_drop", "evidence": "{}",
                         "action": [a for a, _ in actions],
                         "cut_share": [np.nan if s is None else s for _, s in actions],
                         "reason": "net sales fell"})


def _decide(row: dict, amount: float):
    return decide_row(CreditRequest(merchant_id="M1", product="microloan", requested_amount=amount), row, POLICY_)


def test_a_freeze_declines_new_drawdowns_with_the_alert_as_reason():
    effects = limit_effects(_alerts(("freeze", None), ("watch", None)))
    row = apply_effect(_limit_row(), effects["M1"]["microloan"], POLICY_)
    assert row["limit"] == 0.0 and row["monitoring_action"] == "freeze"
    made = _decide(row, 100.0)
    assert made.outcome is Outcome.DECLINE and made.amount == 0.0
    assert made.reasons[0].code == "monitoring.freeze"
    assert "net sales fell" in made.reasons[0].description and "freeze the undrawn microloan limit" in \
        made.reasons[0].description


def test_a_cut_lowers_the_limit_and_says_why_on_a_counter_offer():
    effects = limit_effects(_alerts(("cut", 0.5), ("cut", 0.3)))
    row = apply_effect(_limit_row(limit=5050.0), effects["M1"]["microloan"], POLICY_)
    assert row["limit"] == 2500.0 and row["ead"] == 2500.0 * POLICY_.product("microloan").ccf  # the deeper cut
    made = _decide(row, 4000.0)
    assert made.outcome is Outcome.COUNTER_OFFER and made.amount == 2500.0
    assert [r.code for r in made.reasons] == ["request.above_limit", "monitoring.cut"]
    assert _decide(row, 1000.0).outcome is Outcome.APPROVE


def test_an_escalation_refers_and_watch_or_collateral_calls_leave_limits_alone():
    row = apply_effect(_limit_row(), limit_effects(_alerts(("escalate", None)))["M1"]["microloan"], POLICY_)
    made = _decide(row, 100.0)
    assert made.outcome is Outcome.REFER and made.reasons[0].code == "monitoring.escalate"
    assert limit_effects(_alerts(("watch", None), ("call_collateral", None))) == {}
    plain = apply_effect(_limit_row(), None, POLICY_)
    assert plain["limit"] == 5000.0 and plain["monitoring_action"] is None and plain["monitoring_reasons"] == []
