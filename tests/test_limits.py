"""Limit engine and decisions: the properties a risk officer relies on, checked on generated merchants."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from credit.decision import CreditRequest, Outcome, decide
from credit.limits import (
    CONSTRAINTS,
    EXCLUSION_RULES,
    LIMIT_COLUMNS,
    LimitInputError,
    compute_limits,
    expected_profit,
    product_limits,
)
from credit.policy import PolicyError, load_policy, parse_policy
from credit.strategy import backtest_limits, strategy_tables
from reporting.html import Paragraph, Section, Table, render_page
from reporting.strategy_report import approval_explanation, write_strategy_report
from testkit.synthetic import limit_inputs as merchants

POLICY_FILE = Path(__file__).resolve().parents[1] / "policy.toml"
POLICY = load_policy(POLICY_FILE)
MONEY = st.floats(0.0, 1e7, allow_nan=False)


merchant_rows = st.fixed_dictionaries(
    {
        "segment": st.sampled_from(["corporate", "individual"]),
        "category": st.sampled_from(["apparel", "electronics", "food", "auto_parts"]),
        "tenure_days": st.integers(0, 3000),
        "net_sales_30d": MONEY,
        "net_sales_90d": MONEY,
        "unsettled_order_value": MONEY,
        "open_receivables_current": MONEY,
        "receivables_top_counterparty_share": st.floats(0.0, 1.0),
        "inventory_value_in_warehouse": MONEY,
    }
)


@settings(max_examples=60, deadline=None)
@given(row=merchant_rows, pds=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12))
def test_limits_never_increase_as_pd_rises_for_a_fixed_base(row, pds):
    pds = sorted(pds)
    frame = pd.DataFrame([{**row, "merchant_id": f"M{i}", "pd": p} for i, p in enumerate(pds)])
    limits = compute_limits(frame, POLICY)
    for product, group in limits.groupby("product", observed=True):
        assert np.all(np.diff(group["limit"].to_numpy()) <= 0), product


@settings(max_examples=60, deadline=None)
@given(row=merchant_rows, pd_value=st.floats(0.0, 1.0))
def test_limits_never_exceed_any_cap(row, pd_value):
    frame = pd.DataFrame([{**row, "merchant_id": "M1", "pd": pd_value}])
    limits = compute_limits(frame, POLICY).set_index("product")
    for product, terms in POLICY.products.items():
        out = limits.loc[product]
        assert 0.0 <= out["limit"] <= terms.max_limit
        assert out["limit"] <= terms.max_sales_share * row["net_sales_90d"] + 1e-6
        if out["eligible"]:
            assert out["limit"] <= out["exposure_base"] * terms.advance_rate[out["grade"]] + 1e-6
            assert out["limit"] % terms.round_to == 0 and out["limit"] >= terms.min_limit
        assert out["expected_loss"] <= terms.el_budget + 1e-6
        assert out["exposure_base"] >= 0.0


def test_ineligible_rows_get_zero_and_their_first_failed_rule():
    limits = compute_limits(merchants(5000), POLICY)
    out = limits[~limits["eligible"]]
    assert len(out) > 0 and out["exclusion_reason"].notna().all()
    assert (out[["limit", "ead", "expected_loss", "expected_profit"]] == 0).all().all()
    assert out["binding_constraint"].isna().all() and out["apr"].isna().all()
    assert limits.loc[limits["eligible"], "exclusion_reason"].isna().all()
    # Each rule the policy names excludes someone in a realistic book; individuals never get receivables.
    receivables = limits[limits["product"] == "receivable_financing"]
    individual = receivables["merchant_id"].isin(
        merchants(5000).query("segment == 'individual'")["merchant_id"]
    )
    assert (receivables.loc[individual, "exclusion_reason"] == "segment").all()
    assert {"segment", "tenure", "sales", "grade", "min_limit"} <= set(out["exclusion_reason"].astype(str))


def test_the_first_failing_rule_is_the_one_reported():
    frame = merchants(1).assign(segment="individual", tenure_days=1, net_sales_90d=1.0, pd=0.9)
    reason = compute_limits(frame, POLICY).set_index("product")["exclusion_reason"]
    assert reason["receivable_financing"] == "segment"  # segment is checked before tenure, sales and grade
    assert reason["microloan"] == "tenure"


def test_binding_constraint_is_the_smallest_cap():
    limits = compute_limits(merchants(5000), POLICY)
    eligible = limits[limits["eligible"]]
    assert set(eligible["binding_constraint"].astype(str)) <= set(CONSTRAINTS)
    assert {"collateral", "concentration_cap"} <= set(eligible["binding_constraint"].astype(str))
    capped = eligible[eligible["binding_constraint"] == "absolute_cap"]
    for product, group in capped.groupby("product", observed=True):
        assert (group["limit"] == POLICY.products[product].max_limit).all()


def test_el_apr_and_profit_arithmetic():
    limits = compute_limits(merchants(3000), POLICY)
    for product, group in limits[limits["eligible"]].groupby("product", observed=True):
        terms, p = POLICY.products[product], POLICY.products[product].pricing
        ead = group["limit"] * terms.ccf
        np.testing.assert_allclose(group["ead"], ead)
        np.testing.assert_allclose(group["expected_loss"], group["pd"] * terms.lgd * ead)
        floor = p.funding_rate + group["pd"] * terms.lgd + p.operating_rate + p.margin
        assert (group["apr"] >= floor - 1e-12).all() and (group["apr"] <= p.max_apr).all()
        income = ead * (group["apr"] + p.fee_rate) * (1 - group["pd"])
        profit = income - group["expected_loss"] - ead * (p.funding_rate + p.operating_rate)
        np.testing.assert_allclose(group["expected_profit"], profit)


def test_profit_at_the_apr_floor_is_the_margin_less_the_pd_weighted_price():
    """At APR = funding + PD*LGD + opex + margin, profit per unit = margin + fee - PD * (APR + fee) exactly."""
    terms = POLICY.products["order_financing"]
    pd_values = np.array([0.0, 0.01, 0.1])
    apr = (
        terms.pricing.funding_rate
        + pd_values * terms.lgd
        + terms.pricing.operating_rate
        + terms.pricing.margin
    )
    profit = expected_profit(np.ones(3), apr, pd_values, terms)
    fee = terms.pricing.fee_rate
    np.testing.assert_allclose(profit, terms.pricing.margin + fee - pd_values * (apr + fee))
    assert (
        profit[0] > 0 > expected_profit(np.ones(1), apr[2:], np.ones(1), terms)[0]
    )  # a realised default loses


def test_a_product_added_in_toml_alone_appears_in_the_limits_table():
    text = POLICY_FILE.read_text() + (
        "\n[products.platform_settlement_advance]\n"
        'segments = ["individual"]\nmin_tenure_days = 30\nmin_net_sales_90d = 0\nworst_grade = "C"\n'
        "advance_rate = { A = 0.5, B = 0.4, C = 0.3 }\nmax_sales_share = 1.0\nmax_limit = 10000\n"
        "min_limit = 100\nround_to = 50\nel_budget = 100\nlgd = 0.2\ntenor_days = 14\n"
        "pricing = { funding_rate = 0.05, operating_rate = 0.01, margin = 0.02, max_apr = 0.3 }\n"
        'base = { kind = "unsettled_orders" }\n'
    )
    policy = parse_policy(tomllib.loads(text))
    limits = compute_limits(merchants(2000), policy)
    new = limits[limits["product"] == "platform_settlement_advance"]
    assert len(new) == 2000 and new["eligible"].sum() > 0
    assert (new["limit"] <= 10000).all() and (new["limit"] % 50 == 0).all()
    assert set(new.loc[new["eligible"], "grade"].astype(str)) <= {"A", "B", "C"}


def test_input_errors_name_the_column():
    frame = merchants(10)
    with pytest.raises(LimitInputError, match=r"misses columns \['tenure_days'\]"):
        compute_limits(frame.drop(columns="tenure_days"), POLICY)
    with pytest.raises(
        LimitInputError, match=r"'pd' must lie in \[0, 1\]: 1 rows do not, e.g. merchant M0000003"
    ):
        compute_limits(frame.assign(pd=np.where(frame.index == 3, 1.5, frame["pd"])), POLICY)
    wrong = frame.assign(pd=0.03, grade="A")
    with pytest.raises(LimitInputError, match=r"'grade' disagrees .* 10 rows.*graded A, policy says D"):
        compute_limits(wrong, POLICY)


def test_decisions_approve_counter_refer_and_decline_with_reasons():
    frame = merchants(3).assign(
        segment="corporate", tenure_days=1000, net_sales_90d=90000.0, unsettled_order_value=10000.0, pd=0.003
    )
    frame.loc[2, "pd"] = 0.5
    limits = compute_limits(frame, POLICY)
    limit = limits.query("merchant_id == 'M0000000' and product == 'order_financing'")["limit"].iloc[0]
    assert limit == 8000  # 80% advance on 10,000 of unsettled orders at grade A

    def ask(merchant: str, amount: float):
        return decide(
            CreditRequest(merchant_id=merchant, product="order_financing", requested_amount=amount),
            limits,
            POLICY,
        )

    approved = ask("M0000000", 5000)
    assert (approved.outcome, approved.amount, approved.tenor_days) == (Outcome.APPROVE, 5000, 60)
    countered = ask("M0000000", 12000)
    assert (countered.outcome, countered.amount) == (Outcome.COUNTER_OFFER, 8000)
    assert [r.code for r in countered.reasons] == ["request.above_limit", "limit.collateral"]
    assert "80% of the unsettled orders (10,000)" in countered.reasons[1].description
    referred = ask("M0000000", 50000)
    assert referred.outcome == Outcome.REFER and referred.amount == 0
    assert "more than 2 x" in referred.reasons[0].description
    declined = ask("M0000002", 100)
    assert declined.outcome == Outcome.DECLINE and declined.reasons[0].code == "exclusion.grade"
    assert "risk grade G is worse than E, the worst grade order financing accepts" in declined.reasons[0].description
    assert ask("M9999999", 100).outcome == Outcome.REFER
    with pytest.raises(PolicyError, match="unknown product 'leasing'"):
        decide(CreditRequest(merchant_id="M0000000", product="leasing", requested_amount=1), limits, POLICY)


def test_a_decline_names_the_rule_that_declined_it_in_plain_words():
    """The policy rule is the first reason, with the policy's numbers, never a bare code."""
    frame = merchants(6).assign(segment="individual", tenure_days=1000, net_sales_90d=90000.0, pd=0.003)
    frame.loc[1, "tenure_days"] = 10
    frame.loc[2, "net_sales_90d"] = 50.0
    frame.loc[3, "pd"] = 0.5
    frame.loc[4, "unsettled_order_value"] = 20.0
    limits = compute_limits(frame, POLICY)
    terms = POLICY.products["order_financing"]
    said = {}
    for merchant, product in [("M0000000", "receivable_financing"), ("M0000001", "order_financing"),
                              ("M0000002", "order_financing"), ("M0000003", "order_financing"),
                              ("M0000004", "order_financing")]:
        made = decide(CreditRequest(merchant_id=merchant, product=product, requested_amount=100), limits, POLICY)
        assert made.outcome == Outcome.DECLINE and len(made.reasons) == 1
        said[made.reasons[0].code] = made.reasons[0].description
    assert said == {
        "exclusion.segment": "receivable financing is offered only to corporate merchants",
        "exclusion.tenure": f"fewer than {terms.min_tenure_days} days selling on the platform, the minimum for "
                            "order financing",
        "exclusion.sales": f"net sales of the last 90 days below {terms.min_net_sales_90d:,.0f}, the minimum for "
                           "order financing",
        "exclusion.grade": "risk grade G is worse than E, the worst grade order financing accepts",
        "exclusion.min_limit": f"the order financing limit the merchant qualifies for is below the "
                               f"{terms.min_limit:,.0f} minimum",
    }
    assert {code.removeprefix("exclusion.") for code in said} <= set(EXCLUSION_RULES)


def test_limits_table_has_the_documented_columns():
    assert list(compute_limits(merchants(5), POLICY).columns) == list(LIMIT_COLUMNS)


@pytest.mark.parametrize("n", [0, 1, 37])
def test_all_products_at_once_equal_each_product_alone_stacked_in_policy_order(n):
    """`compute_limits` builds one table for every product (one merchant costs pandas' overhead once); it
    must say exactly what `product_limits`, which the strategy backtest calls per product, says."""
    frame = merchants(max(n, 1), seed=5).head(n)
    frame.index = frame.index * 7 + 3  # the input's index must not leak into the stacked table
    stacked = pd.concat([product_limits(frame, p, POLICY) for p in POLICY.products], ignore_index=True)
    pd.testing.assert_frame_equal(compute_limits(frame, POLICY), stacked, check_exact=True)
    assert (product_limits(frame, "microloan", POLICY).index == frame.index).all()


def _backtest_set(n: int = 4000) -> pd.DataFrame:
    frame = merchants(n, seed=3)
    rng = np.random.default_rng(4)
    return frame.assign(
        product=rng.choice(list(POLICY.products), n),
        defaulted=(rng.uniform(size=n) < frame["pd"]).astype(int),
    )


def test_backtest_realised_figures_follow_the_defaults():
    test = _backtest_set()
    backtest = backtest_limits(test, POLICY)
    assert len(backtest) == len(test) and (backtest["product"].astype(str) == test["product"]).all()
    for product, group in backtest[backtest["eligible"]].groupby("product", observed=True):
        terms = POLICY.products[product]
        bad = group["defaulted"] == 1
        np.testing.assert_allclose(group.loc[bad, "realised_loss"], terms.lgd * group.loc[bad, "ead"])
        assert (group.loc[~bad, "realised_loss"] == 0).all()
        assert (group.loc[bad, "realised_profit"] < 0).all() and (
            group.loc[~bad, "realised_profit"] > 0
        ).all()
    with pytest.raises(PolicyError, match="unknown product 'leasing'"):
        backtest_limits(test.assign(product="leasing"), POLICY)


def test_strategy_tables_add_up_and_pick_the_most_profitable_cutoff():
    backtest = backtest_limits(_backtest_set(), POLICY)
    tables = strategy_tables(backtest)
    assert tables.by_grade["count"].sum() == tables.by_segment["count"].sum() == len(backtest)
    np.testing.assert_allclose(tables.by_product["realised_profit"].sum(), backtest["realised_profit"].sum())
    for product, curve in tables.cutoff_curve.groupby("product"):
        assert np.all(np.diff(curve["approval_rate"]) >= 0) and np.all(np.diff(curve["cutoff_pd"]) > 0)
        eligible = backtest[(backtest["product"] == product) & backtest["eligible"]]
        last = curve.iloc[-1]  # the loosest cut-off approves every eligible row
        assert last["approved"] == len(eligible)
        np.testing.assert_allclose(last["realised_profit"], eligible["realised_profit"].sum())
        best = tables.best_cutoffs.set_index("product").loc[product]
        assert best["realised_profit"] == curve["realised_profit"].max()


def test_strategy_report_says_which_rule_turns_away_how_many_rows():
    limits = compute_limits(merchants(3000).assign(net_sales_90d=lambda f: f["net_sales_90d"] / 40), POLICY)
    tables = strategy_tables(limits)
    ex = tables.exclusions
    counted = ex.set_index(["product", "rule"])["count"]
    for product, group in limits.groupby("product", observed=True):
        rules = group["exclusion_reason"].astype(object).where(~group["eligible"], "eligible")
        assert counted[product].to_dict() == rules.value_counts().to_dict()
    np.testing.assert_allclose(ex.groupby("product")["share"].sum(), 1.0)
    assert set(ex["meaning"]) <= {"eligible", *EXCLUSION_RULES.values()}
    first, *cutoffs = approval_explanation(tables)
    assert first.startswith(f"{limits['eligible'].mean():.1%} of the {len(limits):,} rows are eligible")
    busiest = ex[ex["rule"] != "eligible"].groupby("rule")["count"].sum().idxmax()
    assert f"first rule it failed (the order the policy checks them): {EXCLUSION_RULES[busiest]}:" in first
    assert len(cutoffs) == len(POLICY.products) and all("profit" in s for s in cutoffs)


@pytest.mark.slow
def test_strategy_reports_of_book_and_backtest_are_self_contained_pages_logged_side_by_side(tmp_path, settings):
    """`limits` logs both reports to the champion's run: each keeps its own files and metrics (the backtest's
    used to overwrite the book's `strategy/` files and its `best_cutoff_pd` metrics)."""
    import mlflow

    from models.registry import configure_mlflow

    book = strategy_tables(compute_limits(merchants(1500), POLICY))
    backtest = strategy_tables(backtest_limits(_backtest_set(1500), POLICY))
    configure_mlflow(settings)  # the workspace's experiment: artifacts under SCFRISK_HOME, not ./mlruns
    with mlflow.start_run() as run:
        for tables, folder in ((book, "strategy"), (backtest, "backtest")):
            page = write_strategy_report(
                tables, tmp_path / folder, POLICY.version, run.info.run_id, settings.tracking_uri
            )
            text = page.read_text()
            assert text.count("data:image/png;base64,") == 2 and "@media print" in text
            assert 'src="http' not in text and "<script" not in text  # nothing fetched: works offline, on paper
    assert pd.read_parquet(tmp_path / "backtest" / "best_cutoffs.parquet").shape[0] == len(POLICY.products)
    client = mlflow.tracking.MlflowClient(settings.tracking_uri)
    for kind, folder in (("book", "strategy"), ("backtest", "backtest")):
        logged = {f.path for f in client.list_artifacts(run.info.run_id, f"strategy/{kind}")}
        assert {f"strategy/{kind}/strategy.html", f"strategy/{kind}/cutoff_curve.parquet"} <= logged
        local = client.download_artifacts(run.info.run_id, f"strategy/{kind}/strategy.html", str(tmp_path / kind))
        assert Path(local).read_text() == (tmp_path / folder / "strategy.html").read_text()
    metrics = client.get_run(run.info.run_id).data.metrics
    for name, tables, profit in (("book", book, "expected_profit"), ("backtest", backtest, "realised_profit")):
        for row in tables.best_cutoffs.itertuples():
            assert metrics[f"strategy.{name}.{row.product}.best_cutoff_pd"] == pytest.approx(row.cutoff_pd)
            assert metrics[f"strategy.{name}.{row.product}.best_{profit}"] == pytest.approx(getattr(row, profit))
    assert not any(key.startswith("strategy.microloan") for key in metrics)


def test_html_page_escapes_data_and_formats_tables():
    frame = pd.DataFrame({"name": ["<b>x</b>"], "rate": [0.1234], "amount": [1234567.0], "missing": [np.nan]})
    page = render_page(
        "T & Co", [Section("S", [Table(frame, formats={"rate": "{:.1%}"}), Paragraph("a < b")])]
    )
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page and "T &amp; Co" in page
    assert "12.3%" in page and "1,234,567" in page and "a &lt; b" in page and "–" in page
