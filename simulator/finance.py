"""The money side: warehouse receipts, receivables, loan applications, loans and their repayment."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.schemas import CATEGORIES, PRODUCTS, REGIONS, TABLES
from simulator.arrays import DAY, ids, lognormal, sigmoid, strings, table, ts
from simulator.config import HISTORY_MONTHS, OUTCOME_MONTHS
from simulator.merchants import World
from simulator.oracle import loan_truth

WAREHOUSES_PER_REGION = 3
# Loans. Products in `PRODUCTS` order: order, receivable, warehouse-receipt financing, microloan.
PRODUCT_PD_OFFSET = np.array([-0.2, -0.5, 0.0, 0.5])
PRODUCT_BASE_RATE = np.array([0.08, 0.07, 0.10, 0.14])
PRODUCT_TENOR_DAYS = ((30, 60, 90), (30, 60, 90), (90, 120, 180), (90, 180, 270, 360))
AMORTISING = np.array([False, False, False, True])
"""Microloans repay monthly; the secured products repay in one bullet at maturity (from settlements)."""
PD_INTERCEPT = -3.85
WRITE_OFF_DPD = 180
DEFAULT_DPD = 90


def inventory_receipts(w: World) -> pa.Table:
    rng = w.rng
    rate = w.uses_warehouse[:, None] * w.active * 0.8 * w.seasonal * np.sqrt(w.scale[:, None] / 10.0)
    cells = w.rows_per_cell(rate)
    merchant, n = cells // w.months, len(cells)
    h = w.health[:, : w.months].ravel()[cells]
    received = w.spread_in_month(cells)
    quantity = np.maximum(np.round(lognormal(rng, 20.0 * np.sqrt(w.scale[merchant]), 0.7, n)), 1).astype(
        np.int64
    )
    value = np.round(quantity * w.ticket[merchant] * rng.uniform(0.45, 0.65, n), 2)
    turnover_days = lognormal(rng, 35.0 * np.exp(-0.4 * h), 0.5, n)
    released = received + (turnover_days * DAY).astype(np.int64)
    category = np.where(rng.random(n) < 0.9, w.category[merchant], rng.integers(0, len(CATEGORIES), n))
    warehouse = w.region[merchant] * WAREHOUSES_PER_REGION + rng.integers(0, WAREHOUSES_PER_REGION, n)
    labels = [f"WH-{r}-{k + 1}" for r in REGIONS for k in range(WAREHOUSES_PER_REGION)]
    return pa.table(  # the receipt's whole life, release included: `timeline.as_of` cuts it at an instant
        {
            "receipt_id": ids(n),
            "merchant_id": strings(merchant, w.merchant_ids),
            "warehouse_id": strings(warehouse, labels),
            "category": strings(category, CATEGORIES),
            "quantity": quantity,
            "appraised_value": value,
            "received_at": ts(received),
            "released_at": ts(released),
        }
    )


def receivables(w: World) -> pa.Table:
    """B2B invoices of corporate merchants (a few concentrated buyers each) plus platform settlements."""
    rng = w.rng
    b2b_rate = w.corporate[:, None] * w.active * 1.5 * np.sqrt(w.scale[:, None] / 15.0)
    b2b = w.rows_per_cell(b2b_rate)
    platform = w.rows_per_cell(w.active * np.where(w.corporate, 0.3, 0.15)[:, None])
    cells = np.concatenate([b2b, platform])
    is_b2b = np.arange(len(cells)) < len(b2b)
    merchant, n = cells // w.months, len(cells)
    h = w.health[:, : w.months].ravel()[cells]

    n_buyers = 1 + rng.poisson(3.0, w.n)
    buyer_pool = rng.integers(1, 100_000, (w.n, n_buyers.max(initial=1)))
    slot = (n_buyers[merchant] * rng.random(n) ** 2).astype(np.int64)  # skewed: the first buyer dominates
    counterparty = np.where(is_b2b, buyer_pool[merchant, slot], 0)
    codes, index = np.unique(counterparty, return_inverse=True)
    labels = ["platform" if c == 0 else f"B{c:06d}" for c in codes]

    amount = np.round(lognormal(rng, w.ticket[merchant] * np.where(is_b2b, 40.0, 15.0), 0.8, n), 2)
    issued = w.spread_in_month(cells)
    due = issued + rng.choice([30, 60, 90], n) * DAY
    delay_days = rng.normal(-2.0, 3.0, n) + rng.exponential(4.0 * np.exp(-0.8 * h))
    bad = rng.random(n) < sigmoid(-4.5 - 1.2 * h)
    delay_days += bad * rng.uniform(60, 180, n)
    paid = np.maximum(issued + DAY, due + (delay_days * DAY).astype(np.int64))
    order = np.lexsort((issued, merchant))
    return pa.table(  # payment included, even after the window: `timeline.as_of` cuts it at an instant
        {
            "receivable_id": ids(n),
            "merchant_id": strings(merchant[order], w.merchant_ids),
            "counterparty_id": strings(index[order], labels),
            "amount": amount[order],
            "issued_at": ts(issued[order]),
            "due_at": ts(due[order]),
            "paid_at": ts(paid[order]),
        }
    )


def loans(w: World) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    """Applications, loans, their month-end performance and the oracle's truth about each loan."""
    rng = w.rng
    months = np.arange(w.months)
    first_data_month = (
        np.searchsorted(w.month_start, np.maximum(w.onboarded, w.window_start), side="right") - 1
    )
    eligible = months[None, :] >= first_data_month[:, None] + HISTORY_MONTHS
    h_all = w.health[:, : w.months]
    appetite = rng.normal(-0.2, 1.0, w.n)
    applies = eligible & (rng.random(h_all.shape) < sigmoid(appetite[:, None] - 0.35 * h_all))
    cells = np.flatnonzero(applies)
    merchant, month, n = cells // w.months, cells % w.months, len(cells)
    h = h_all.ravel()[cells]

    # Product: what the merchant can pledge (B2B receivables, goods in a warehouse) decides what it asks for.
    weights = np.stack(
        [
            np.full(n, 0.45),
            np.where(w.corporate[merchant], 0.35, 0.03),  # individuals: platform receivables only
            np.where(w.uses_warehouse[merchant], 0.35, 0.0),
            0.2 + 0.2 * ~w.corporate[merchant] + 0.15 * (h < -1.0),
        ],
        axis=1,
    )
    product = (rng.random(n)[:, None] > np.cumsum(weights / weights.sum(1, keepdims=True), 1)).sum(1)
    product = np.minimum(product, len(PRODUCTS) - 1)
    monthly_gmv = w.order_rate.ravel()[cells] / np.maximum(w.active.ravel()[cells], 1e-9) * w.ticket[merchant]
    base = monthly_gmv * np.array([0.6, 1.2, 0.5, 1.0])[product] * rng.uniform(0.5, 1.5, n)
    requested = np.maximum(np.round(base, -2), 500.0)
    applied = w.spread_in_month(cells)

    approved = rng.random(n) < sigmoid(2.7 + 1.2 * (h + rng.normal(0.0, 0.5, n)))
    disbursed = applied + (rng.uniform(0.1, 3.0, n) * DAY).astype(np.int64)
    is_loan = approved & (disbursed < w.end)
    loan_app = np.flatnonzero(is_loan)  # application row (0-based) of each loan
    merchant_l, month_l, product_l, h_l = merchant[is_loan], month[is_loan], product[is_loan], h[is_loan]
    m = len(loan_app)
    disbursed = disbursed[is_loan]
    principal = np.maximum(np.round(requested[is_loan] * rng.uniform(0.7, 1.0, m), -2), 500.0)
    maturity = disbursed + _tenor_days(rng, product_l) * DAY
    rate = PRODUCT_BASE_RATE[product_l] + 0.08 * sigmoid(-(h_l + rng.normal(0.0, 0.7, m)))

    # Truth: health at the application and its change over the next six months (shocks hit here).
    cumulative = np.concatenate([np.zeros((w.n, 1)), np.cumsum(w.health, axis=1)], axis=1)
    future = (cumulative[merchant_l, month_l + 7] - cumulative[merchant_l, month_l + 1]) / 6.0
    true_pd = sigmoid(PD_INTERCEPT + PRODUCT_PD_OFFSET[product_l] - 1.4 * h_l - 0.9 * (future - h_l))
    defaulted = rng.random(m) < true_pd
    outcome_complete = month_l + OUTCOME_MONTHS < w.months

    performance, missed = _performance(w, merchant_l, product_l, h_l, principal, disbursed, maturity, defaulted)
    loan_ids = ids(m)
    applications = table(
        TABLES["loan_applications"].arrow_schema,
        {
            "application_id": ids(n),
            "merchant_id": strings(merchant, w.merchant_ids),
            "product": strings(product, PRODUCTS),
            "requested_amount": requested,
            "applied_at": ts(applied),
        },
    )
    loan_table = table(
        TABLES["loans"].arrow_schema,
        {
            "loan_id": loan_ids,
            "application_id": loan_app + 1,
            "merchant_id": strings(merchant_l, w.merchant_ids),
            "product": strings(product_l, PRODUCTS),
            "principal": principal,
            "annual_rate": np.round(rate, 4),
            "disbursed_at": ts(disbursed),
            "maturity_at": ts(maturity),
        },
    )
    truth = loan_truth(
        w, loan_ids, loan_app + 1, merchant_l, product_l, true_pd, h_l, defaulted, outcome_complete,
        dpd90=ts(missed + DEFAULT_DPD * DAY, defaulted),
    )
    return applications, loan_table, performance, truth


def _tenor_days(rng: np.random.Generator, product: np.ndarray) -> np.ndarray:
    days = np.empty(len(product), dtype=np.int64)
    for p, choices in enumerate(PRODUCT_TENOR_DAYS):
        rows = np.flatnonzero(product == p)
        days[rows] = rng.choice(choices, len(rows))
    return days


def _performance(
    w: World,
    merchant: np.ndarray,
    product: np.ndarray,
    h: np.ndarray,
    principal: np.ndarray,
    disbursed: np.ndarray,
    maturity: np.ndarray,
    defaulted: np.ndarray,
) -> tuple[pa.Table, np.ndarray]:
    """Month-end rows of each loan from disbursement until repaid, written off or the window end.

    A defaulter misses a payment (the bullet at maturity, or an instalment within 8 months) and is
    90+ days past due at a month end within 12 months of disbursement; a few others slip 5-60 days and cure.
    Also returns when each loan first misses a payment (a defaulter stays late from then on).
    """
    rng, m = w.rng, len(merchant)
    amortising = AMORTISING[product]
    tenor = maturity - disbursed
    missed = np.where(
        amortising,
        disbursed + (rng.uniform(0.15, 1.0, m) * np.minimum(tenor, 240 * DAY)).astype(np.int64),
        maturity,
    )
    slips = ~defaulted & (rng.random(m) < sigmoid(-2.0 - 0.8 * h))
    slip_start = np.where(
        amortising, disbursed + (rng.uniform(0.2, 0.9, m) * tenor).astype(np.int64), maturity
    )
    slip_end = slip_start + (rng.uniform(5.0, 60.0, m) * DAY).astype(np.int64)
    repaid = np.where(slips, np.maximum(maturity, slip_end), maturity)
    closed = np.where(defaulted, missed + WRITE_OFF_DPD * DAY, repaid)

    month_end = w.month_start[1:] - 1
    first = np.searchsorted(month_end, disbursed)
    last = np.minimum(np.searchsorted(month_end, closed), w.months - 1)
    counts = last - first + 1
    loan = np.repeat(np.arange(m), counts)
    step = np.arange(len(loan)) - np.repeat(np.cumsum(counts) - counts, counts)
    at = month_end[first[loan] + step]

    in_slip = slips[loan] & (slip_start[loan] <= at) & (at < slip_end[loan])
    late_since = np.where(defaulted[loan], missed[loan], np.where(in_slip, slip_start[loan], at))
    dpd = np.maximum(at - late_since, 0) // DAY
    paid_through = np.minimum(at, late_since)  # a late loan's balance stops amortising
    share = np.where(amortising[loan], np.clip((maturity[loan] - paid_through) / tenor[loan], 0.0, 1.0), 1.0)
    outstanding = np.where(~defaulted[loan] & (repaid[loan] <= at), 0.0, np.round(principal[loan] * share, 2))
    return table(
        TABLES["loan_performance"].arrow_schema,
        {
            "record_id": ids(len(loan)),
            "loan_id": loan + 1,
            "merchant_id": strings(merchant[loan], w.merchant_ids),
            "observed_at": ts(at),
            "days_past_due": dpd.astype(np.int32),
            "outstanding": outstanding,
        },
    ), missed
