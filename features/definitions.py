"""Declarative merchant features: the single source of the SQL, the catalogue and the reason-code text.

Point-in-time rule: a feature for (merchant, as_of) sees only facts whose OWN timestamp is strictly before
`as_of`. Each source below is a point-in-time view: the row is in it when its time column is before
`as_of`, and every later state change (cancel, refund, rating, payment, release) is masked by its own
timestamp. The raw `status` column is the order's *latest* state and is therefore never used.

Windows: a window of `w` days with lag `l` keeps facts whose age (as_of minus the fact's time) lies in
`(l, l + w]` days; so a fact exactly 30 days before `as_of` is inside the 30-day window, a fact at
exactly `as_of` is outside every window.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Kind = Literal["numeric", "categorical"]
UNITS = ("CNY", "ratio", "days", "count", "stars", "minutes", "months", "category")
WINDOWS = (30, 90, 180, 365, None)
DERIVED = "derived"
COUNT_KEYS = "count(*) FILTER (WHERE {x} > 0)"
"""Outer aggregate of a two-stage feature counting the distinct keys seen in the window (one grouping pass
per key serves many features, where each DISTINCT aggregate would need its own)."""

MONEY = "CAST({} AS DECIMAL(18, 2))"
DAYS = "CAST({} AS DECIMAL(18, 6))"
"""Amounts to the cent and durations to the microday, as fixed-point numbers: their sums are exact, so a
feature does not depend on the order its facts are added in (floating-point sums do, in the last bit, with
DuckDB's threads and with the other merchants of a batch). The local engine and every partition of the
dask engine then compute bit-equal features. The raw amounts are cents already; a microday is 86 ms.
(A later column reads a raw column of the same name, not the cast one: write the cast where it is used.)"""


@dataclass(frozen=True)
class Source:
    """A point-in-time view of one raw table for a given entity (merchant_id, as_of).

    `columns` are (name, SQL) pairs over the raw row, `as_of` and `age_days`; later pairs may use
    earlier names. Features can use only these columns, so nothing unmasked can leak.
    """

    name: str
    table: str
    time_column: str
    columns: tuple[tuple[str, str], ...]
    relation: str = "{table}"
    """FROM clause; `{<table name>}` placeholders become the raw store's Parquet readers."""


@dataclass(frozen=True)
class Feature:
    """One merchant feature. `aggregation` is a single SQL aggregate call over the source's columns
    (or, for `source="derived"`, an expression over other features)."""

    name: str
    source: str
    aggregation: str
    window_days: int | None
    description: str
    direction: int
    """Expected effect of a higher value on default risk: +1 raises it, -1 lowers it, 0 unknown."""
    unit: str
    filter: str | None = None
    lag_days: int = 0
    """Shift the window back: lag 90 with window 90 is the 90 days before the last 90."""
    per: str | None = None
    """Two-stage features: aggregate per this key first (buyer, week, loan), then `outer` over `{x}`."""
    outer: str | None = None
    fill: float | None = None
    """Value when the merchant has no fact at all in the window (0 for sums and counts; None = unknown)."""
    kind: Kind = "numeric"

    @property
    def lookback_days(self) -> int | None:
        return None if self.window_days is None else self.window_days + self.lag_days


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "merchants",
            "merchants",
            "onboarded_at",
            (
                ("merchant_type", "merchant_type"),
                ("category", "category"),
                ("region", "region"),
                ("registered_capital", "registered_capital"),
            ),
        ),
        Source(
            "orders",
            "orders",
            "ordered_at",
            (
                ("amount", MONEY.format("amount")),
                ("buyer_id", "buyer_id"),
                ("order_day", "CAST(ordered_at AS DATE)"),
                ("week", "CAST(ceil(age_days / 7) AS INTEGER) - 1"),
                ("cancelled", "coalesce(cancelled_at < as_of, false)"),
                ("refunded", "coalesce(refunded_at < as_of, false)"),
                ("net_amount", f"CASE WHEN cancelled OR refunded THEN 0 ELSE {MONEY.format('amount')} END"),
                ("settled", "coalesce(settled_at < as_of, false)"),
                (
                    "unsettled_amount",
                    f"CASE WHEN cancelled OR refunded OR settled THEN 0 ELSE {MONEY.format('amount')} END",
                ),
                (
                    "days_to_ship",
                    "CASE WHEN shipped_at < as_of THEN "
                    + DAYS.format("(epoch_us(shipped_at) - epoch_us(ordered_at)) / 86400e6") + " END",
                ),
                (
                    "late",
                    "CASE WHEN promised_delivery_at < as_of AND NOT cancelled THEN "
                    "coalesce(delivered_at >= as_of OR delivered_at > promised_delivery_at, true)::INT END",
                ),
                ("known_rating", "CASE WHEN rated_at < as_of THEN rating END"),
            ),
        ),
        Source(
            "events",
            "behaviour_events",
            "event_at",
            (
                ("event_type", "event_type"),
                ("event_day", "CAST(event_at AS DATE)"),
                ("response_minutes", "CASE WHEN event_type = 'cs_response' THEN " + DAYS.format("value") + " END"),
            ),
        ),
        Source(
            "inventory",
            "inventory_receipts",
            "received_at",
            (
                ("appraised_value", MONEY.format("appraised_value")),
                ("in_warehouse", "NOT coalesce(released_at < as_of, false)"),
                ("days_held", DAYS.format("age_days")),
            ),
        ),
        Source("inventory_releases", "inventory_receipts", "released_at",
               (("appraised_value", MONEY.format("appraised_value")),)),
        Source(
            "receivables",
            "receivables",
            "issued_at",
            (
                ("amount", MONEY.format("amount")),
                ("counterparty_id", "counterparty_id"),
                ("paid", "coalesce(paid_at < as_of, false)"),
                ("overdue", "NOT paid AND due_at < as_of"),
                ("not_yet_due", "NOT paid AND due_at >= as_of"),
                ("late_or_overdue", "CASE WHEN due_at < as_of THEN (overdue OR paid_at > due_at)::INT END"),
                (
                    "days_to_collect",
                    "CASE WHEN paid THEN "
                    + DAYS.format("(epoch_us(paid_at) - epoch_us(issued_at)) / 86400e6") + " END",
                ),
            ),
        ),
        Source("applications", "loan_applications", "applied_at", (("requested_amount", "requested_amount"),)),
        Source("loans", "loans", "disbursed_at", (("principal", MONEY.format("principal")),)),
        Source(
            "repayments",
            "loan_performance",
            "observed_at",
            (
                ("loan_id", "loan_id"),
                ("observed_at", "observed_at"),
                ("days_past_due", "days_past_due"),
                ("outstanding", "outstanding"),
                ("principal", "principal"),
            ),
            relation=(
                "(SELECT p.*, l.principal FROM {loan_performance} p JOIN {loans} l ON l.loan_id = p.loan_id)"
            ),
        ),
    )
}


def _f(name: str, source: str, aggregation: str, window: int | None, description: str, direction: int,
       unit: str, **extra: object) -> Feature:
    return Feature(name, source, aggregation, window, description, direction, unit, **extra)  # type: ignore[arg-type]


def _sales_windows() -> list[Feature]:
    out = []
    for w in (30, 90, 180, 365):
        out.append(_f(f"net_sales_{w}d", "orders", "sum(net_amount)", w,
                      f"Value of orders placed in the last {w} days, less those cancelled or refunded so far.",
                      -1, "CNY", fill=0.0))
    for w in (30, 90):
        out.append(_f(f"gmv_{w}d", "orders", "sum(amount)", w,
                      f"Gross value of all orders placed in the last {w} days.", -1, "CNY", fill=0.0))
        out.append(_f(f"orders_{w}d", "orders", "count(*)", w,
                      f"Number of orders placed in the last {w} days.", -1, "count", fill=0.0))
    return out


def _ratio(name: str, num: str, den: str, description: str, direction: int, unit: str = "ratio",
           minus_one: bool = False) -> Feature:
    expr = f"{num} / nullif({den}, 0)" + (" - 1" if minus_one else "")
    return _f(name, DERIVED, expr, None, description, direction, unit)


FEATURES: tuple[Feature, ...] = (
    # --- profile -----------------------------------------------------------------------------------
    _f("segment", "merchants", "any_value(merchant_type)", None,
       "Legal form of the merchant: corporate or individual.", 0, "category", kind="categorical"),
    _f("category", "merchants", "any_value(category)", None,
       "Main product category the merchant sells.", 0, "category", kind="categorical"),
    _f("region", "merchants", "any_value(region)", None,
       "Region where the merchant is registered.", 0, "category", kind="categorical"),
    _f("tenure_days", "merchants", "max(age_days)", None,
       "Days since the merchant opened its shop on the platform.", -1, "days"),
    _f("registered_capital", "merchants", "any_value(registered_capital)", None,
       "Registered capital of a corporate merchant (unknown for individuals).", -1, "CNY"),
    # --- sales scale and growth --------------------------------------------------------------------
    *_sales_windows(),
    _f("avg_order_value_90d", "orders", "avg(amount)", 90,
       "Average value of an order placed in the last 90 days.", 0, "CNY"),
    _f("net_sales_prev_30d", "orders", "sum(net_amount)", 30,
       "Net sales of the 30 days before the last 30 days.", -1, "CNY", lag_days=30, fill=0.0),
    _f("net_sales_prev_90d", "orders", "sum(net_amount)", 90,
       "Net sales of the 90 days before the last 90 days.", -1, "CNY", lag_days=90, fill=0.0),
    _f("net_sales_30d_last_year", "orders", "sum(net_amount)", 30,
       "Net sales of the same 30 days one year earlier (the seasonal reference).", 0, "CNY",
       lag_days=365, fill=0.0),
    _ratio("sales_growth_30d", "net_sales_30d", "net_sales_prev_30d",
           "Change of net sales in the last 30 days against the 30 days before.", -1, minus_one=True),
    _ratio("sales_growth_90d", "net_sales_90d", "net_sales_prev_90d",
           "Change of net sales in the last 90 days against the 90 days before.", -1, minus_one=True),
    _f("seasonal_sales_drop_30d", DERIVED, "1 - net_sales_30d / nullif(net_sales_30d_last_year, 0)", None,
       "Drop of net sales in the last 30 days against the same season last year (negative = growth).",
       1, "ratio"),
    _f("unsettled_order_value", "orders", "sum(unsettled_amount)", None,
       "Value of orders placed but not yet cancelled, refunded or paid out to the merchant.", 0, "CNY",
       fill=0.0),
    # --- stability ---------------------------------------------------------------------------------
    _f("sales_trend_26w", "orders", "sum(net_amount)", 365,
       "Weekly net-sales trend over 26 weeks, as a share of average weekly sales (negative = shrinking).",
       -1, "ratio", per="week", filter="week < 26",
       outer="(26 * sum(-{k} * {x}) + 325 * sum({x})) / 38025.0 / nullif(sum({x}) / 26, 0)"),
    _f("weekly_sales_volatility_12w", "orders", "sum(net_amount)", 90,
       "Week-to-week variability of net sales over 12 weeks (standard deviation over mean).", 1, "ratio",
       per="week", filter="week < 12",
       outer="sqrt(greatest(sum({x} * {x}) / 12 - pow(sum({x}) / 12, 2), 0)) / nullif(sum({x}) / 12, 0)"),
    _f("weekly_sales_volatility_26w", "orders", "sum(net_amount)", 365,
       "Week-to-week variability of net sales over 26 weeks (standard deviation over mean).", 1, "ratio",
       per="week", filter="week < 26",
       outer="sqrt(greatest(sum({x} * {x}) / 26 - pow(sum({x}) / 26, 2), 0)) / nullif(sum({x}) / 26, 0)"),
    _f("weeks_without_sales_12w", "orders", "sum(net_amount)", 90,
       "Weeks out of the last 12 with no net sales.", 1, "count",
       per="week", filter="week < 12", outer="12 - count(*) FILTER (WHERE {x} > 0)", fill=12.0),
    # --- quality -----------------------------------------------------------------------------------
    _f("cancellation_rate_30d", "orders", "avg(cancelled::INT)", 30,
       "Share of orders placed in the last 30 days that were cancelled.", 1, "ratio"),
    _f("cancellation_rate_90d", "orders", "avg(cancelled::INT)", 90,
       "Share of orders placed in the last 90 days that were cancelled.", 1, "ratio"),
    _f("refund_rate_90d", "orders", "avg(refunded::INT)", 90,
       "Share of orders placed in the last 90 days that were refunded.", 1, "ratio"),
    _f("refund_rate_180d", "orders", "avg(refunded::INT)", 180,
       "Share of orders placed in the last 180 days that were refunded.", 1, "ratio"),
    _f("late_delivery_rate_30d", "orders", "avg(late)", 30,
       "Share of orders due in the last 30 days that arrived after the promised date or not at all.",
       1, "ratio"),
    _f("late_delivery_rate_90d", "orders", "avg(late)", 90,
       "Share of orders due in the last 90 days that arrived after the promised date or not at all.",
       1, "ratio"),
    _f("avg_days_to_ship_90d", "orders", "avg(days_to_ship)", 90,
       "Average days between an order and its shipment, orders of the last 90 days.", 1, "days"),
    _f("avg_rating_90d", "orders", "avg(known_rating)", 90,
       "Average buyer rating (1-5) of orders placed in the last 90 days.", -1, "stars"),
    _f("avg_rating_365d", "orders", "avg(known_rating)", 365,
       "Average buyer rating (1-5) of orders placed in the last year.", -1, "stars"),
    _f("avg_rating_prev_90d", "orders", "avg(known_rating)", 90,
       "Average buyer rating of orders placed 90 to 180 days ago.", -1, "stars", lag_days=90),
    _f("rating_trend_90d", DERIVED, "avg_rating_90d - avg_rating_prev_90d", None,
       "Change of the average rating against the previous 90 days (negative = worsening).", -1, "stars"),
    _f("low_rating_share_90d", "orders", "avg((known_rating <= 2)::INT)", 90,
       "Share of ratings of 1 or 2 stars among rated orders of the last 90 days.", 1, "ratio"),
    _f("complaints_90d", "events", "count(*)", 90,
       "Buyer complaints received in the last 90 days.", 1, "count", filter="event_type = 'complaint'",
       fill=0.0),
    _ratio("complaint_rate_90d", "complaints_90d", "orders_90d",
           "Complaints per order over the last 90 days.", 1),
    # --- customer base -----------------------------------------------------------------------------
    _f("unique_buyers_90d", "orders", "count(*)", 90,
       "Distinct buyers in the last 90 days.", -1, "count", per="buyer_id", outer=COUNT_KEYS, fill=0.0),
    _f("unique_buyers_365d", "orders", "count(*)", 365,
       "Distinct buyers in the last year.", -1, "count", per="buyer_id", outer=COUNT_KEYS, fill=0.0),
    _f("repeat_buyer_share_365d", "orders", "count(*)", 365,
       "Share of last year's buyers who ordered more than once.", -1, "ratio",
       per="buyer_id", outer="avg(({x} >= 2)::INT)"),
    _f("top_buyer_share_90d", "orders", "sum(amount)", 90,
       "Share of the last 90 days' sales bought by the single largest buyer.", 1, "ratio",
       per="buyer_id", outer="max({x}) / nullif(sum({x}), 0)"),
    _f("buyer_concentration_hhi_90d", "orders", "sum(amount)", 90,
       "Concentration of sales across buyers, last 90 days (Herfindahl index: 1 = a single buyer).",
       1, "ratio", per="buyer_id", outer="sum({x} * {x}) / nullif(pow(sum({x}), 2), 0)"),
    # --- operations --------------------------------------------------------------------------------
    _f("active_days_30d", "orders", "count(*)", 30,
       "Days with at least one order in the last 30 days.", -1, "days", per="order_day", outer=COUNT_KEYS,
       fill=0.0),
    _f("active_days_90d", "orders", "count(*)", 90,
       "Days with at least one order in the last 90 days.", -1, "days", per="order_day", outer=COUNT_KEYS,
       fill=0.0),
    _f("days_since_last_order", "orders", "min(age_days)", 365,
       "Days since the last order (unknown when none in the last year).", 1, "days"),
    _f("logins_30d", "events", "count(*)", 30,
       "Logins to the merchant back office in the last 30 days.", -1, "count",
       filter="event_type = 'login'", fill=0.0),
    _f("login_days_30d", "events", "count(*)", 30,
       "Days with a login in the last 30 days.", -1, "days", filter="event_type = 'login'",
       per="event_day", outer=COUNT_KEYS, fill=0.0),
    _f("days_since_last_login", "events", "min(age_days)", None,
       "Days since the merchant last logged in.", 1, "days", filter="event_type = 'login'"),
    _f("listing_changes_30d", "events", "count(*)", 30,
       "Product listing changes in the last 30 days.", 0, "count",
       filter="event_type = 'listing_change'", fill=0.0),
    _f("price_changes_30d", "events", "count(*)", 30,
       "Price changes in the last 30 days.", 0, "count", filter="event_type = 'price_change'", fill=0.0),
    _f("cs_response_minutes_90d", "events", "avg(response_minutes)", 90,
       "Average customer-service response time in the last 90 days.", 1, "minutes"),
    # --- inventory ---------------------------------------------------------------------------------
    _f("inventory_value_in_warehouse", "inventory", "sum(appraised_value)", None,
       "Appraised value of goods now held in partner warehouses.", -1, "CNY",
       filter="in_warehouse", fill=0.0),
    _f("open_warehouse_receipts", "inventory", "count(*)", None,
       "Warehouse receipts not yet released.", 0, "count", filter="in_warehouse", fill=0.0),
    _f("inventory_received_90d", "inventory", "sum(appraised_value)", 90,
       "Appraised value of goods deposited in the last 90 days.", 0, "CNY", fill=0.0),
    _f("inventory_released_90d", "inventory_releases", "sum(appraised_value)", 90,
       "Appraised value of goods released from warehouses in the last 90 days.", -1, "CNY", fill=0.0),
    _f("avg_inventory_age_days", "inventory", "avg(days_held)", None,
       "Average days the goods now in warehouses have been there.", 1, "days", filter="in_warehouse"),
    _ratio("inventory_turnover_90d", "inventory_released_90d", "inventory_value_in_warehouse",
           "Goods released in 90 days per unit of goods now in stock (higher = faster moving).", -1),
    _f("days_of_inventory", DERIVED, "inventory_value_in_warehouse / nullif(net_sales_90d / 90, 0)", None,
       "Days of net sales the goods in warehouses represent.", 1, "days"),
    # --- receivables -------------------------------------------------------------------------------
    _f("open_receivables_current", "receivables", "sum(amount)", None,
       "Receivables still unpaid and not yet due.", 0, "CNY", filter="not_yet_due", fill=0.0),
    _f("open_receivables_total", "receivables", "sum(amount)", None,
       "All receivables still unpaid.", 0, "CNY", filter="NOT paid", fill=0.0),
    _f("overdue_receivables", "receivables", "sum(amount)", None,
       "Receivables past their due date and still unpaid.", 1, "CNY", filter="overdue", fill=0.0),
    _ratio("receivables_overdue_share", "overdue_receivables", "open_receivables_total",
           "Share of unpaid receivables that are past due.", 1),
    _f("receivables_top_counterparty_share", "receivables", "sum(amount)", None,
       "Share of unpaid receivables owed by the single largest debtor.", 1, "ratio",
       filter="NOT paid", per="counterparty_id", outer="max({x}) / nullif(sum({x}), 0)"),
    _f("receivables_issued_90d", "receivables", "sum(amount)", 90,
       "Receivables issued in the last 90 days.", -1, "CNY", fill=0.0),
    _f("days_sales_outstanding", DERIVED, "open_receivables_total / nullif(receivables_issued_90d / 90, 0)",
       None, "Days of invoicing that unpaid receivables represent.", 1, "days"),
    _f("receivables_late_share_365d", "receivables", "avg(late_or_overdue)", 365,
       "Share of receivables fallen due (issued in the last year) that were paid late or are unpaid.",
       1, "ratio"),
    _f("avg_days_to_collect_180d", "receivables", "avg(days_to_collect)", 180,
       "Average days from invoice to payment, receivables issued in the last 180 days.", 1, "days"),
    # --- credit history on the platform ------------------------------------------------------------
    _f("prior_applications_365d", "applications", "count(*)", 365,
       "Credit applications made in the last year.", 1, "count", fill=0.0),
    _f("prior_loans", "loans", "count(*)", None,
       "Loans received from the platform before.", -1, "count", fill=0.0),
    _f("prior_loans_365d", "loans", "count(*)", 365,
       "Loans received from the platform in the last year.", 0, "count", fill=0.0),
    _f("prior_principal_total", "loans", "sum(principal)", None,
       "Total amount borrowed from the platform before.", 0, "CNY", fill=0.0),
    _ratio("approval_share_365d", "prior_loans_365d", "prior_applications_365d",
           "Share of last year's credit applications that led to a loan.", -1),
    _f("worst_dpd_ever", "repayments", "max(days_past_due)", None,
       "Worst days past due ever observed on a platform loan.", 1, "days"),
    _f("worst_dpd_365d", "repayments", "max(days_past_due)", 365,
       "Worst days past due observed on a platform loan in the last year.", 1, "days"),
    _f("recent_dpd", "repayments", "arg_max(days_past_due, observed_at)", 90,
       "Days past due at the latest month-end observation, worst across loans.", 1, "days",
       per="loan_id", outer="max({x})"),
    _f("credit_utilisation", "repayments", "arg_max(outstanding / nullif(principal, 0), observed_at)", 90,
       "Outstanding balance over principal at the latest observation, highest across loans.", 1, "ratio",
       per="loan_id", outer="max({x})"),
    _f("months_since_last_delinquency", "repayments", "min(age_days / 30.4375)", None,
       "Months since a loan was last seen past due (unknown when never).", -1, "months",
       filter="days_past_due > 0"),
    _f("delinquent_months_365d", "repayments", "count(DISTINCT date_trunc('month', observed_at))", 365,
       "Months in the last year with a loan past due at month end.", 1, "count",
       filter="days_past_due > 0", fill=0.0),
)

FEATURE_INDEX: dict[str, Feature] = {f.name: f for f in FEATURES}


def feature(name: str) -> Feature:
    """The definition of one feature, or a clear error."""
    try:
        return FEATURE_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown feature '{name}'") from None


def feature_names() -> list[str]:
    return [f.name for f in FEATURES]


def with_inputs(names: Iterable[str]) -> tuple[Feature, ...]:
    """The named features and the features their derived ones are computed from, in definition order: the
    subset a query computes when a caller reads only these (`features.sql.features_sql` takes any closed subset)."""
    wanted = {feature(name).name for name in names}
    for f in reversed(FEATURES):  # a derived feature reads only earlier ones
        if f.name in wanted and f.source == DERIVED:
            wanted |= _identifiers(f.aggregation) & FEATURE_INDEX.keys()
    return tuple(f for f in FEATURES if f.name in wanted)


WORDING = ("description", "unit", "direction")
"""Fields of a feature that say how its value reads or is expected to act, not what the value is."""


def feature_set_version() -> str:
    """Hash of what computes the values (sources and definitions, not their wording): stored snapshots are
    reused, and two models' test rows are comparable, only while it is unchanged. Rewording a description
    neither rebuilds the store nor keeps a challenger from being compared with its champion."""
    features = [{k: v for k, v in asdict(f).items() if k not in WORDING} for f in FEATURES]
    payload = json.dumps({"sources": [asdict(s) for s in SOURCES.values()], "features": features}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


UNIT_FORMATS: dict[str, str] = {
    "ratio": "{:.0%}",
    "CNY": "CNY {:,.0f}",
    "stars": "{:.1f} / 5",
    "minutes": "{:.0f} min",
    "months": "{:.0f} months",
    "days": "{:.0f} days",
    "number": "{:,.4g}",
}
"""How a number of each unit reads in a reason code; other units print as a whole number."""


def format_value(value: object, unit: str, decimals: int = 0) -> str:
    """A value as a risk officer reads it in a reason code: 0.18 ratio -> '18%', 1234.5 CNY -> 'CNY 1,235';
    `decimals` more than the unit's usual precision."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    if unit == "category":
        return str(value)
    spec = re.sub(r"\.(\d+)([f%])", lambda m: f".{int(m[1]) + decimals}{m[2]}", UNIT_FORMATS.get(unit, "{:,.0f}"))
    text = spec.format(float(value))  # type: ignore[arg-type]
    return text.removesuffix("s") if unit in ("days", "months") and text.startswith("1 ") else text


def format_pair(value: object, reference: object, unit: str) -> tuple[str, str]:
    """Two values compared in one sentence, with as many decimals (up to 3 more) as it takes to tell different
    numbers apart: '1.4 days, higher than 1 day' would read '1 day, higher than 1 day'."""
    for decimals in range(4):
        texts = format_value(value, unit, decimals), format_value(reference, unit, decimals)
        if texts[0] != texts[1] or value == reference:
            return texts
    return format_value(value, unit), format_value(reference, unit)  # equal as far as anyone reads them


def _validate() -> None:
    """Fail at import on a malformed definition: a bad catalogue must never reach SQL or docs."""
    seen: set[str] = set()
    for f in FEATURES:
        problems = []
        if f.name in seen:
            problems.append("duplicate name")
        if f.unit not in UNITS:
            problems.append(f"unit must be one of {UNITS}")
        if f.direction not in (-1, 0, 1):
            problems.append("direction must be -1, 0 or +1")
        if f.source == DERIVED:
            unknown = {w for w in _identifiers(f.aggregation) if w not in seen}
            if unknown:
                problems.append(f"derived from unknown or later features {sorted(unknown)}")
        elif f.source not in SOURCES:
            problems.append(f"unknown source '{f.source}'")
        elif f.window_days not in WINDOWS:
            problems.append(f"window must be one of {WINDOWS}")
        elif not re.fullmatch(r"\w+\(.*\)", f.aggregation):
            problems.append("aggregation must be one aggregate call, e.g. sum(amount); ratios are derived")
        if (f.per is None) != (f.outer is None):
            problems.append("`per` and `outer` go together")
        if problems:
            raise ValueError(f"feature '{f.name}': {'; '.join(problems)}")
        seen.add(f.name)


def _identifiers(expression: str) -> set[str]:
    return {w for w in re.findall(r"[a-z_][a-z0-9_]*", expression) if w not in {"nullif"}}


_validate()
