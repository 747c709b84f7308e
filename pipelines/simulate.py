"""Synthetic platform: merchants whose latent financial health drives everything the platform records.

Each merchant has a monthly latent health (level + trend + AR noise + rare persistent shocks + a little
seasonality). Health sets sales level and growth, cancel/refund/complaint rates, shipping delays,
ratings, logins, inventory turnover, receivable delays, and who applies for which product. A loan's
TRUE probability of default depends on health at the application AND over the following months, so
pre-application behaviour predicts default well but not perfectly. The truth goes to `oracle/`, which
training never reads.

The output is a snapshot at the end of the window: nothing that happens lies at or after `config.end`
(only planned dates, the schema's `scheduled` columns, may) and each status is the state at that
instant. Generation is vectorised with numpy, one chunk of merchants at a time, and every chunk writes
its own part file per table so memory stays bounded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from pipelines.config import ModelConfig
from pipelines.errors import ScfriskError
from pipelines.schemas import (
    CATEGORIES,
    EVENT_TYPES,
    MERCHANT_TYPES,
    ORDER_STATUSES,
    PRODUCTS,
    REGIONS,
    TABLES,
    TIMESTAMP,
)

log = logging.getLogger(__name__)

DAY = 86_400
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
the simulated window (only then is `defaulted` observable in `loan_performance`)."""

ID_COLUMNS = ("order_id", "event_id", "receipt_id", "receivable_id", "application_id", "loan_id", "record_id")
"""Int64 keys: each chunk numbers from 1 and the writer shifts them past the previous chunks'."""

# Sales multiplier by calendar month: Chinese New Year dip, 6.18 mid-year festival, 11.11 and 12.12.
SEASONALITY = np.array([0.85, 0.80, 0.95, 0.95, 1.00, 1.35, 0.95, 0.95, 1.00, 1.05, 1.70, 1.15])
FESTIVALS = {6: 18, 11: 11}
"""Festival day by calendar month: a share of that month's orders lands in the three days up to it."""
FESTIVAL_SHARE = 0.35
CATEGORY_WEIGHTS = np.array([0.22, 0.12, 0.16, 0.12, 0.12, 0.10, 0.08, 0.08])
CATEGORY_TICKET = np.array([45.0, 180.0, 70.0, 40.0, 25.0, 60.0, 35.0, 90.0])
REGION_WEIGHTS = np.array([0.30, 0.22, 0.25, 0.10, 0.13])
WAREHOUSES_PER_REGION = 3

# Loans. Products in `PRODUCTS` order: order, receivable, warehouse-receipt financing, microloan.
PRODUCT_PD_OFFSET = np.array([-0.2, -0.5, 0.0, 0.5])
PRODUCT_BASE_RATE = np.array([0.08, 0.07, 0.10, 0.14])
PRODUCT_TENOR_DAYS = ((30, 60, 90), (30, 60, 90), (90, 120, 180), (90, 180, 270, 360))
AMORTISING = np.array([False, False, False, True])
"""Microloans repay monthly; the secured products repay in one bullet at maturity (from settlements)."""
PD_INTERCEPT = -3.85
HISTORY_MONTHS = 3
"""Months of data a merchant needs inside the window before it can apply."""
OUTCOME_MONTHS = 12
WRITE_OFF_DPD = 180


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate; the same config (seed included) always gives byte-identical tables."""

    n_merchants: int = 2000
    months: int = 24
    seed: int = 42
    start: str | date = "2024-01-01"
    chunk_size: int = 5000
    orders_per_month: float = 10.0
    """Average orders per merchant-month of the window (heavy-tailed across merchants)."""

    def __post_init__(self) -> None:
        if self.n_merchants < 1:
            raise ScfriskError(f"n_merchants must be at least 1, got {self.n_merchants}")
        if self.months < HISTORY_MONTHS:
            raise ScfriskError(f"months must be at least {HISTORY_MONTHS}, got {self.months}")
        if self.chunk_size < 1:
            raise ScfriskError(f"chunk_size must be at least 1, got {self.chunk_size}")
        try:
            first = np.datetime64(str(self.start), "D")
        except ValueError:
            raise ScfriskError(f"start must be a date YYYY-MM-DD, got {self.start!r}") from None
        if first != first.astype("datetime64[M]").astype("datetime64[D]"):
            raise ScfriskError(f"start must be the first day of a month, got {self.start}")

    @property
    def first_month(self) -> np.datetime64:
        return np.datetime64(str(self.start), "M")

    @property
    def end(self) -> np.datetime64:
        """First instant after the window: everything recorded in the snapshot happened before it."""
        return (self.first_month + self.months).astype("datetime64[s]")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_merchants // self.chunk_size)


@dataclass
class SimulationSummary:
    config: SimulationConfig
    out: Path
    rows: dict[str, int] = field(default_factory=dict)
    complete_loans: int = 0
    complete_defaults: int = 0
    true_pd_sum: float = 0.0
    seconds: float = 0.0

    @property
    def default_rate(self) -> float:
        return self.complete_defaults / self.complete_loans if self.complete_loans else float("nan")

    @property
    def mean_true_pd(self) -> float:
        return self.true_pd_sum / self.complete_loans if self.complete_loans else float("nan")

    def add(self, tables: dict[str, pa.Table]) -> None:
        for name in TABLES:
            self.rows[name] = self.rows.get(name, 0) + tables[name].num_rows
        oracle = tables[f"{ORACLE_DIR}/loans"]
        complete = oracle["outcome_complete"].to_numpy(zero_copy_only=False)
        self.complete_loans += int(complete.sum())
        self.complete_defaults += int(oracle["defaulted"].to_numpy(zero_copy_only=False)[complete].sum())
        self.true_pd_sum += float(oracle["true_pd"].to_numpy()[complete].sum())

    def describe(self) -> str:
        c = self.config
        last_day = (c.end - np.timedelta64(1, "D")).astype("datetime64[D]")
        lines = [
            (
                f"simulated {c.n_merchants:,} merchants x {c.months} months ({c.start} .. {last_day}, "
                f"seed {c.seed}) into {self.out} in {self.seconds:.1f} s"
            ),
            *(f"  {name:<20} {n:>12,} rows" for name, n in self.rows.items()),
            (
                f"  loans with a complete {OUTCOME_MONTHS}-month window: {self.complete_loans:,}, "
                f"defaulted {self.default_rate:.2%} (mean true PD {self.mean_true_pd:.2%})"
            ),
        ]
        return "\n".join(lines)


def months_to_train(model: ModelConfig) -> int:
    """The shortest simulated history a PD model can be trained on with these model settings.

    Merchants apply only after `HISTORY_MONTHS` of data; a loan's label needs `label_horizon_months`
    after it; the out-of-time split needs at least one training month of labelled applications, then
    `valid_months` and `test_months`.
    """
    return HISTORY_MONTHS + 1 + model.valid_months + model.test_months + model.label_horizon_months


def simulate_platform(config: SimulationConfig, out: Path | str) -> SimulationSummary:
    """Write every raw table (and the oracle) as `out/<table>/part-NNNNN.parquet`, one part per chunk."""
    out = Path(out)
    started = time.perf_counter()
    folders = [*TABLES, *(f"{ORACLE_DIR}/{name}" for name in ORACLE_SCHEMAS)]
    for folder in folders:
        path = out / folder
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("part-*.parquet"):
            stale.unlink()
    summary = SimulationSummary(config=config, out=out)
    next_id = dict.fromkeys(ID_COLUMNS, 0)
    with Progress(transient=True) as progress:
        task = progress.add_task("simulating merchants", total=config.n_merchants)
        for chunk in range(config.n_chunks):
            tables = _shift_ids(simulate_chunk(config, chunk), next_id)
            for folder, table in tables.items():
                _write(table, out / folder / f"part-{chunk:05d}.parquet")
            summary.add(tables)
            progress.advance(task, tables["merchants"].num_rows)
    summary.seconds = time.perf_counter() - started
    log.info("simulation written to %s in %.1f s", out, summary.seconds)
    return summary


def _write(table: pa.Table, path: Path) -> None:
    """Delta-encode keys and timestamps (sorted per merchant, so deltas are small): a third smaller files."""
    delta = [f.name for f in table.schema if f.name in ID_COLUMNS or pa.types.is_timestamp(f.type)]
    pq.write_table(
        table,
        path,
        compression="zstd",
        use_dictionary=[name for name in table.column_names if name not in delta],
        column_encoding=dict.fromkeys(delta, "DELTA_BINARY_PACKED"),
    )


def _shift_ids(tables: dict[str, pa.Table], next_id: dict[str, int]) -> dict[str, pa.Table]:
    """Make a chunk's int64 keys globally unique by offsetting them past the previous chunks' keys."""
    offsets = dict(next_id)
    for spec in TABLES.values():
        if spec.key in next_id:
            next_id[spec.key] += tables[spec.name].num_rows
    shifted = {}
    for name, table in tables.items():
        for column in set(table.column_names) & set(ID_COLUMNS):
            i = table.schema.get_field_index(column)
            values = table[column].to_numpy() + offsets[column]
            table = table.set_column(i, table.schema.field(i), pa.array(values, pa.int64()))
        shifted[name] = table
    return shifted


def simulate_chunk(config: SimulationConfig, chunk: int) -> dict[str, pa.Table]:
    """All tables for one chunk of merchants, int64 keys numbered from 1 within the chunk."""
    rng = np.random.default_rng([config.seed, chunk])
    first = chunk * config.chunk_size
    n = min(config.chunk_size, config.n_merchants - first)
    world = _World(config, rng, first, n)
    applications, loans, performance, oracle = _loans(world)
    return {
        "merchants": world.merchants_table(),
        "orders": _orders(world),
        "behaviour_events": _events(world),
        "inventory_receipts": _inventory(world),
        "receivables": _receivables(world),
        "loan_applications": applications,
        "loans": loans,
        "loan_performance": performance,
        f"{ORACLE_DIR}/loans": oracle,
        f"{ORACLE_DIR}/merchant_health": world.health_table(),
    }


# --------------------------------------------------------------------------------------------- helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lognormal(rng: np.random.Generator, mean: np.ndarray | float, sigma: float, size: int) -> np.ndarray:
    """Lognormal draws with the given MEAN (not median), so scale parameters read as averages."""
    return np.asarray(mean) * rng.lognormal(-0.5 * sigma**2, sigma, size)


def _day(seconds: np.ndarray) -> np.ndarray:
    return seconds - seconds % DAY


def _ts(seconds: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    micros = np.asarray(seconds, dtype=np.int64) * 1_000_000
    return pa.array(micros, TIMESTAMP, mask=None if valid is None else ~valid)


def _strings(codes: np.ndarray, labels: list[str] | tuple[str, ...]) -> pa.Array:
    """Label per row from integer codes, built in Arrow so millions of rows cost no Python strings."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(labels)).dictionary_decode()


def _table(schema: pa.Schema, columns: dict[str, object]) -> pa.Table:
    return pa.table(columns, schema=schema)


def _ids(n: int) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.int64)


class _World:
    """One chunk's merchants, their monthly latent health and the calendar both live on."""

    def __init__(self, config: SimulationConfig, rng: np.random.Generator, first: int, n: int) -> None:
        self.rng, self.n, self.months = rng, n, config.months
        horizon = config.months + OUTCOME_MONTHS  # health after the window drives late outcomes
        month_starts = config.first_month + np.arange(horizon + 1)
        self.month_start = month_starts.astype("datetime64[s]").astype(np.int64)
        self.calendar_month = month_starts.astype(int) % 12 + 1
        self.end = int(config.end.astype(np.int64))
        self.window_start = int(self.month_start[0])
        self.merchant_ids = [f"M{i:07d}" for i in range(first + 1, first + n + 1)]

        self.corporate = rng.random(n) < 0.35
        self.category = rng.choice(len(CATEGORIES), n, p=CATEGORY_WEIGHTS)
        self.region = rng.choice(len(REGIONS), n, p=REGION_WEIGHTS)
        before = rng.random(n) < 0.65
        span_before = 48 * 30 * DAY
        span_during = self.end - self.window_start - 45 * DAY
        self.onboarded = np.where(
            before,
            self.window_start - rng.random(n) * span_before,
            self.window_start + rng.random(n) * span_during,
        ).astype(np.int64)
        self.capital = np.round(_lognormal(rng, 2_000_000, 1.0, n), -3)
        self.uses_warehouse = rng.random(n) < np.where(self.corporate, 0.45, 0.08)
        # Scale: orders per month at neutral health in a neutral month; corporates sell ~2.5x more.
        scale_mean = config.orders_per_month * 1.12 * np.where(self.corporate, 1.9, 0.75)
        self.scale = _lognormal(rng, scale_mean, 1.0, n)
        self.ticket = _lognormal(
            rng, CATEGORY_TICKET[self.category] * np.where(self.corporate, 1.4, 1.0), 0.4, n
        )

        self.health = self._health(horizon)
        seasonal = SEASONALITY[self.calendar_month[: self.months] - 1]
        lo = np.maximum(self.month_start[None, : self.months], self.onboarded[:, None])
        hi = self.month_start[None, 1 : self.months + 1]
        self.active = np.clip((hi - lo) / (hi - self.month_start[None, : self.months]), 0.0, 1.0)
        tenure_months = (hi - self.onboarded[:, None]) / (30 * DAY)
        ramp = 1.0 - 0.6 * np.exp(-np.maximum(tenure_months, 0.0) / 3.0)
        h = self.health[:, : self.months]
        self.order_rate = (
            self.scale[:, None] * seasonal[None, :] * np.exp(0.45 * h - 0.1) * ramp * self.active
        )

    def _health(self, horizon: int) -> np.ndarray:
        rng, n = self.rng, self.n
        level = rng.normal(0.0, 0.8, n)
        trend = rng.normal(0.0, 0.03, n)
        noise = rng.normal(0.0, 0.5, n)
        shock = np.zeros(n)
        health = np.empty((n, horizon))
        for t in range(horizon):
            noise = 0.8 * noise + rng.normal(0.0, 0.3, n)
            hit = rng.random(n) < 0.012
            shock = 0.93 * shock + np.where(hit, rng.normal(-1.8, 0.6, n), 0.0)
            cash_flow = 0.15 * (SEASONALITY[self.calendar_month[t] - 1] - 1.0)
            health[:, t] = level + trend * (t - self.months / 2) + noise + shock + cash_flow
        return health

    def spread_in_month(self, cells: np.ndarray, festival_share: float = 0.0) -> np.ndarray:
        """A timestamp for each row of a merchant-month cell, uniform over the merchant's active part."""
        merchant, month = cells // self.months, cells % self.months
        lo = np.maximum(self.month_start[month], self.onboarded[merchant])
        hi = self.month_start[month + 1]
        if festival_share:
            festival_day = np.array([FESTIVALS.get(int(m), 0) for m in self.calendar_month])[month]
            rush_hi = self.month_start[month] + festival_day * DAY
            rush_lo = np.maximum(lo, rush_hi - 3 * DAY)
            rush = (festival_day > 0) & (rush_lo < rush_hi) & (self.rng.random(len(cells)) < festival_share)
            lo, hi = np.where(rush, rush_lo, lo), np.where(rush, rush_hi, hi)
        return lo + (self.rng.random(len(cells)) * (hi - lo)).astype(np.int64)

    def rows_per_cell(self, rate: np.ndarray) -> np.ndarray:
        """Poisson counts per merchant-month -> the cell index of every row, in merchant-month order."""
        counts = self.rng.poisson(rate).ravel()
        return np.repeat(np.arange(counts.size), counts)

    def merchants_table(self) -> pa.Table:
        return _table(
            TABLES["merchants"].arrow_schema,
            {
                "merchant_id": pa.array(self.merchant_ids),
                "merchant_type": _strings(
                    np.where(self.corporate, 0, 1), MERCHANT_TYPES
                ),  # corporate, individual
                "category": _strings(self.category, CATEGORIES),
                "region": _strings(self.region, REGIONS),
                "onboarded_at": _ts(self.onboarded),
                "registered_capital": pa.array(self.capital, pa.float64(), mask=~self.corporate),
            },
        )

    def health_table(self) -> pa.Table:
        merchant = np.repeat(np.arange(self.n), self.months)
        month = np.tile(self.month_start[: self.months], self.n)
        return _table(
            ORACLE_SCHEMAS["merchant_health"],
            {
                "merchant_id": _strings(merchant, self.merchant_ids),
                "month": _ts(month),
                "health": np.round(self.health[:, : self.months].ravel(), 4),
            },
        )


def _orders(w: _World) -> pa.Table:
    rng = w.rng
    cells = w.rows_per_cell(w.order_rate)
    n = len(cells)
    merchant = cells // w.months
    # Sort by merchant, then time: the natural order of a shop's order book (and compresses better).
    ordered = w.spread_in_month(cells, FESTIVAL_SHARE)
    order = np.lexsort((ordered, merchant))
    cells, merchant, ordered = cells[order], merchant[order], ordered[order]
    h = w.health[:, : w.months].ravel()[cells]

    amount = np.maximum(np.round(_lognormal(rng, w.ticket[merchant], 0.6, n), 2), 1.0)
    buyer = rng.integers(1, 5_000_000, n, dtype=np.int64)
    promised = _day(ordered) + 5 * DAY - 1  # end of the fourth day after the order
    will_cancel = rng.random(n) < _sigmoid(-3.4 - 0.6 * h)
    cancelled = ordered + (rng.uniform(0.05, 2.0, n) * DAY).astype(np.int64)
    shipped = ordered + ((0.2 + rng.gamma(2.0, 0.5 * np.exp(-0.4 * h))) * DAY).astype(np.int64)
    delivered = shipped + ((1.0 + rng.gamma(2.0, 0.6, n)) * DAY).astype(np.int64)
    late = delivered > promised
    will_refund = rng.random(n) < _sigmoid(-3.0 - 0.6 * h + 1.0 * late)
    refunded = delivered + (rng.uniform(0.5, 7.0, n) * DAY).astype(np.int64)  # inside the 7-day window
    settled = _day(delivered) + 8 * DAY + 2 * 3600  # nightly batch once the 7-day confirmation has passed
    rated = delivered + ((0.1 + rng.exponential(2.0, n)) * DAY).astype(np.int64)
    stars = np.clip(np.round(4.3 + 0.4 * h - 0.8 * late - 2.0 * will_refund + rng.normal(0, 0.7, n)), 1, 5)

    # Snapshot at the window end: an event that has not happened yet is not there.
    is_cancelled = will_cancel & (cancelled < w.end)
    is_shipped = ~will_cancel & (shipped < w.end)
    is_delivered = is_shipped & (delivered < w.end)
    is_refunded = is_delivered & will_refund & (refunded < w.end)
    is_settled = is_delivered & ~will_refund & (settled < w.end)
    is_rated = is_delivered & (rng.random(n) < 0.55) & (rated < w.end)
    status = np.select(
        [is_cancelled, is_refunded, is_settled, is_delivered, is_shipped],
        [ORDER_STATUSES.index(s) for s in ("cancelled", "refunded", "completed", "delivered", "shipped")],
        default=ORDER_STATUSES.index("paid"),
    )
    return _table(
        TABLES["orders"].arrow_schema,
        {
            "order_id": _ids(n),
            "merchant_id": _strings(merchant, w.merchant_ids),
            "buyer_id": buyer,
            "ordered_at": _ts(ordered),
            "amount": amount,
            "status": _strings(status, ORDER_STATUSES),
            "promised_delivery_at": _ts(promised),
            "shipped_at": _ts(shipped, is_shipped),
            "delivered_at": _ts(delivered, is_delivered),
            "cancelled_at": _ts(cancelled, is_cancelled),
            "refunded_at": _ts(refunded, is_refunded),
            "rating": pa.array(stars.astype(np.int8), pa.int8(), mask=~is_rated),
            "rated_at": _ts(rated, is_rated),
            "settled_at": _ts(settled, is_settled),
        },
    )


def _events(w: _World) -> pa.Table:
    rng = w.rng
    h = w.health[:, : w.months]
    complaints = rng.poisson(w.order_rate * _sigmoid(-3.2 - 0.8 * h))
    rates = {
        "login": w.active * (2.0 + 16.0 * _sigmoid(1.2 * h + 0.3)),
        "listing_change": w.active * 1.5 * np.exp(0.3 * h),
        "price_change": w.active * 2.0 * SEASONALITY[w.calendar_month[: w.months] - 1][None, :],
        "complaint": complaints,
        "cs_response": complaints + rng.poisson(w.active * 2.0),  # complaints plus buyer inquiries
    }
    counts = np.stack(
        [rates[t] if t in ("complaint", "cs_response") else rng.poisson(rates[t]) for t in EVENT_TYPES],
        axis=-1,
    ).ravel()
    rows = np.repeat(np.arange(counts.size), counts)
    cells, event_type = rows // len(EVENT_TYPES), rows % len(EVENT_TYPES)
    merchant = cells // w.months
    at = w.spread_in_month(cells)
    order = np.lexsort((at, merchant))
    cells, event_type, merchant, at = cells[order], event_type[order], merchant[order], at[order]
    is_response = event_type == EVENT_TYPES.index("cs_response")
    minutes = np.round(np.exp(2.5 - 0.5 * h.ravel()[cells] + rng.normal(0.0, 0.8, len(cells))), 1)
    return _table(
        TABLES["behaviour_events"].arrow_schema,
        {
            "event_id": _ids(len(cells)),
            "merchant_id": _strings(merchant, w.merchant_ids),
            "event_at": _ts(at),
            "event_type": _strings(event_type, EVENT_TYPES),
            "value": pa.array(minutes, pa.float64(), mask=~is_response),
        },
    )


def _inventory(w: _World) -> pa.Table:
    rng = w.rng
    seasonal = SEASONALITY[w.calendar_month[: w.months] - 1][None, :]
    rate = w.uses_warehouse[:, None] * w.active * 0.8 * seasonal * np.sqrt(w.scale[:, None] / 10.0)
    cells = w.rows_per_cell(rate)
    merchant, n = cells // w.months, len(cells)
    h = w.health[:, : w.months].ravel()[cells]
    received = w.spread_in_month(cells)
    quantity = np.maximum(np.round(_lognormal(rng, 20.0 * np.sqrt(w.scale[merchant]), 0.7, n)), 1).astype(
        np.int64
    )
    value = np.round(quantity * w.ticket[merchant] * rng.uniform(0.45, 0.65, n), 2)
    turnover_days = _lognormal(rng, 35.0 * np.exp(-0.4 * h), 0.5, n)
    released = received + (turnover_days * DAY).astype(np.int64)
    category = np.where(rng.random(n) < 0.9, w.category[merchant], rng.integers(0, len(CATEGORIES), n))
    warehouse = w.region[merchant] * WAREHOUSES_PER_REGION + rng.integers(0, WAREHOUSES_PER_REGION, n)
    labels = [f"WH-{r}-{k + 1}" for r in REGIONS for k in range(WAREHOUSES_PER_REGION)]
    return _table(
        TABLES["inventory_receipts"].arrow_schema,
        {
            "receipt_id": _ids(n),
            "merchant_id": _strings(merchant, w.merchant_ids),
            "warehouse_id": _strings(warehouse, labels),
            "category": _strings(category, CATEGORIES),
            "quantity": quantity,
            "appraised_value": value,
            "received_at": _ts(received),
            "released_at": _ts(released, released < w.end),
        },
    )


def _receivables(w: _World) -> pa.Table:
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

    amount = np.round(_lognormal(rng, w.ticket[merchant] * np.where(is_b2b, 40.0, 15.0), 0.8, n), 2)
    issued = w.spread_in_month(cells)
    due = issued + rng.choice([30, 60, 90], n) * DAY
    delay_days = rng.normal(-2.0, 3.0, n) + rng.exponential(4.0 * np.exp(-0.8 * h))
    bad = rng.random(n) < _sigmoid(-4.5 - 1.2 * h)
    delay_days += bad * rng.uniform(60, 180, n)
    paid = np.maximum(issued + DAY, due + (delay_days * DAY).astype(np.int64))
    order = np.lexsort((issued, merchant))
    return _table(
        TABLES["receivables"].arrow_schema,
        {
            "receivable_id": _ids(n),
            "merchant_id": _strings(merchant[order], w.merchant_ids),
            "counterparty_id": _strings(index[order], labels),
            "amount": amount[order],
            "issued_at": _ts(issued[order]),
            "due_at": _ts(due[order]),
            "paid_at": _ts(paid[order], paid[order] < w.end),
        },
    )


def _loans(w: _World) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    rng = w.rng
    months = np.arange(w.months)
    first_data_month = (
        np.searchsorted(w.month_start, np.maximum(w.onboarded, w.window_start), side="right") - 1
    )
    eligible = months[None, :] >= first_data_month[:, None] + HISTORY_MONTHS
    h_all = w.health[:, : w.months]
    appetite = rng.normal(-0.2, 1.0, w.n)
    applies = eligible & (rng.random(h_all.shape) < _sigmoid(appetite[:, None] - 0.35 * h_all))
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

    approved = rng.random(n) < _sigmoid(2.7 + 1.2 * (h + rng.normal(0.0, 0.5, n)))
    disbursed = applied + (rng.uniform(0.1, 3.0, n) * DAY).astype(np.int64)
    is_loan = approved & (disbursed < w.end)
    loan_app = np.flatnonzero(is_loan)  # application row (0-based) of each loan
    merchant_l, month_l, product_l, h_l = merchant[is_loan], month[is_loan], product[is_loan], h[is_loan]
    m = len(loan_app)
    disbursed = disbursed[is_loan]
    principal = np.maximum(np.round(requested[is_loan] * rng.uniform(0.7, 1.0, m), -2), 500.0)
    maturity = disbursed + _tenor_days(rng, product_l) * DAY
    rate = PRODUCT_BASE_RATE[product_l] + 0.08 * _sigmoid(-(h_l + rng.normal(0.0, 0.7, m)))

    # Truth: health at the application and its change over the next six months (shocks hit here).
    cumulative = np.concatenate([np.zeros((w.n, 1)), np.cumsum(w.health, axis=1)], axis=1)
    future = (cumulative[merchant_l, month_l + 7] - cumulative[merchant_l, month_l + 1]) / 6.0
    true_pd = _sigmoid(PD_INTERCEPT + PRODUCT_PD_OFFSET[product_l] - 1.4 * h_l - 0.9 * (future - h_l))
    defaulted = rng.random(m) < true_pd
    outcome_complete = month_l + OUTCOME_MONTHS < w.months

    performance = _performance(w, rng, merchant_l, product_l, h_l, principal, disbursed, maturity, defaulted)
    loan_ids = _ids(m)
    applications = _table(
        TABLES["loan_applications"].arrow_schema,
        {
            "application_id": _ids(n),
            "merchant_id": _strings(merchant, w.merchant_ids),
            "product": _strings(product, PRODUCTS),
            "requested_amount": requested,
            "applied_at": _ts(applied),
        },
    )
    loans = _table(
        TABLES["loans"].arrow_schema,
        {
            "loan_id": loan_ids,
            "application_id": loan_app + 1,
            "merchant_id": _strings(merchant_l, w.merchant_ids),
            "product": _strings(product_l, PRODUCTS),
            "principal": principal,
            "annual_rate": np.round(rate, 4),
            "disbursed_at": _ts(disbursed),
            "maturity_at": _ts(maturity),
        },
    )
    oracle = _table(
        ORACLE_SCHEMAS["loans"],
        {
            "loan_id": loan_ids,
            "application_id": loan_app + 1,
            "merchant_id": _strings(merchant_l, w.merchant_ids),
            "product": _strings(product_l, PRODUCTS),
            "true_pd": true_pd,
            "health_at_application": h_l,
            "defaulted": defaulted,
            "outcome_complete": outcome_complete,
        },
    )
    return applications, loans, performance, oracle


def _tenor_days(rng: np.random.Generator, product: np.ndarray) -> np.ndarray:
    days = np.empty(len(product), dtype=np.int64)
    for p, choices in enumerate(PRODUCT_TENOR_DAYS):
        rows = np.flatnonzero(product == p)
        days[rows] = rng.choice(choices, len(rows))
    return days


def _performance(
    w: _World,
    rng: np.random.Generator,
    merchant: np.ndarray,
    product: np.ndarray,
    h: np.ndarray,
    principal: np.ndarray,
    disbursed: np.ndarray,
    maturity: np.ndarray,
    defaulted: np.ndarray,
) -> pa.Table:
    """Month-end rows of each loan from disbursement until repaid, written off or the window end.

    A defaulter misses a payment (the bullet at maturity, or an instalment within 8 months) and is
    90+ days past due at a month end within 12 months of disbursement; a few others slip 5-60 days and cure.
    """
    m = len(merchant)
    amortising = AMORTISING[product]
    tenor = maturity - disbursed
    missed = np.where(
        amortising,
        disbursed + (rng.uniform(0.15, 1.0, m) * np.minimum(tenor, 240 * DAY)).astype(np.int64),
        maturity,
    )
    slips = ~defaulted & (rng.random(m) < _sigmoid(-2.0 - 0.8 * h))
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
    return _table(
        TABLES["loan_performance"].arrow_schema,
        {
            "record_id": _ids(len(loan)),
            "loan_id": loan + 1,
            "merchant_id": _strings(merchant[loan], w.merchant_ids),
            "observed_at": _ts(at),
            "days_past_due": dpd.astype(np.int32),
            "outstanding": outstanding,
        },
    )
