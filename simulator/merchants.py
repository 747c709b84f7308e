"""Who sells on the platform: merchants, their monthly latent health, and the calendar both live on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.schemas import CATEGORIES, MERCHANT_TYPES, REGIONS, TABLES
from simulator.arrays import DAY, lognormal, strings, table, ts
from simulator.config import OUTCOME_MONTHS, SimulationConfig

# Sales multiplier by calendar month: Chinese New Year dip, 6.18 mid-year festival, 11.11 and 12.12.
SEASONALITY = np.array([0.85, 0.80, 0.95, 0.95, 1.00, 1.35, 0.95, 0.95, 1.00, 1.05, 1.70, 1.15])
FESTIVALS = {6: 18, 11: 11}
"""Festival day by calendar month: a share of that month's orders lands in the three days up to it."""
CATEGORY_WEIGHTS = np.array([0.22, 0.12, 0.16, 0.12, 0.12, 0.10, 0.08, 0.08])
CATEGORY_TICKET = np.array([45.0, 180.0, 70.0, 40.0, 25.0, 60.0, 35.0, 90.0])
REGION_WEIGHTS = np.array([0.30, 0.22, 0.25, 0.10, 0.13])


class World:
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
        self.capital = np.round(lognormal(rng, 2_000_000, 1.0, n), -3)
        self.uses_warehouse = rng.random(n) < np.where(self.corporate, 0.45, 0.08)
        # Scale: orders per month at neutral health in a neutral month; corporates sell ~2.5x more.
        scale_mean = config.orders_per_month * 1.12 * np.where(self.corporate, 1.9, 0.75)
        self.scale = lognormal(rng, scale_mean, 1.0, n)
        self.ticket = lognormal(
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

    @property
    def seasonal(self) -> np.ndarray:
        """The window's sales multipliers as one row, to broadcast over merchants."""
        return SEASONALITY[self.calendar_month[: self.months] - 1][None, :]

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


def merchants(w: World) -> pa.Table:
    return table(
        TABLES["merchants"].arrow_schema,
        {
            "merchant_id": pa.array(w.merchant_ids),
            "merchant_type": strings(np.where(w.corporate, 0, 1), MERCHANT_TYPES),  # corporate, individual
            "category": strings(w.category, CATEGORIES),
            "region": strings(w.region, REGIONS),
            "onboarded_at": ts(w.onboarded),
            "registered_capital": pa.array(w.capital, pa.float64(), mask=~w.corporate),
        },
    )
