"""What merchants do on the platform: orders through their life, and behaviour events."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.schemas import EVENT_TYPES, TABLES
from simulator.arrays import DAY, day, ids, lognormal, sigmoid, strings, table, ts
from simulator.merchants import World

FESTIVAL_SHARE = 0.35
"""Share of a festival month's orders that lands in the three days up to the festival."""


def orders(w: World) -> pa.Table:
    """Every order of the window through its whole life (its later events may lie after the window end)."""
    rng = w.rng
    cells = w.rows_per_cell(w.order_rate)
    n = len(cells)
    merchant = cells // w.months
    # Sort by merchant, then time: the natural order of a shop's order book (and compresses better).
    ordered = w.spread_in_month(cells, FESTIVAL_SHARE)
    order = np.lexsort((ordered, merchant))
    cells, merchant, ordered = cells[order], merchant[order], ordered[order]
    h = w.health[:, : w.months].ravel()[cells]

    amount = np.maximum(np.round(lognormal(rng, w.ticket[merchant], 0.6, n), 2), 1.0)
    buyer = rng.integers(1, 5_000_000, n, dtype=np.int64)
    promised = day(ordered) + 5 * DAY - 1  # end of the fourth day after the order
    will_cancel = rng.random(n) < sigmoid(-3.4 - 0.6 * h)
    cancelled = ordered + (rng.uniform(0.05, 2.0, n) * DAY).astype(np.int64)
    shipped = ordered + ((0.2 + rng.gamma(2.0, 0.5 * np.exp(-0.4 * h))) * DAY).astype(np.int64)
    delivered = shipped + ((1.0 + rng.gamma(2.0, 0.6, n)) * DAY).astype(np.int64)
    late = delivered > promised
    will_refund = rng.random(n) < sigmoid(-3.0 - 0.6 * h + 1.0 * late)
    refunded = delivered + (rng.uniform(0.5, 7.0, n) * DAY).astype(np.int64)  # inside the 7-day window
    settled = day(delivered) + 8 * DAY + 2 * 3600  # nightly batch once the 7-day confirmation has passed
    rated = delivered + ((0.1 + rng.exponential(2.0, n)) * DAY).astype(np.int64)
    stars = np.clip(np.round(4.3 + 0.4 * h - 0.8 * late - 2.0 * will_refund + rng.normal(0, 0.7, n)), 1, 5)

    # The order's whole life; what has happened by an instant is `timeline.as_of`'s to say.
    delivers = ~will_cancel
    rates = delivers & (rng.random(n) < 0.55)
    return pa.table(
        {
            "order_id": ids(n),
            "merchant_id": strings(merchant, w.merchant_ids),
            "buyer_id": buyer,
            "ordered_at": ts(ordered),
            "amount": amount,
            "promised_delivery_at": ts(promised),
            "shipped_at": ts(shipped, delivers),
            "delivered_at": ts(delivered, delivers),
            "cancelled_at": ts(cancelled, will_cancel),
            "refunded_at": ts(refunded, delivers & will_refund),
            "rating": pa.array(stars.astype(np.int8), pa.int8(), mask=~rates),
            "rated_at": ts(rated, rates),
            "settled_at": ts(settled, delivers & ~will_refund),
        }
    )


def behaviour_events(w: World) -> pa.Table:
    rng = w.rng
    h = w.health[:, : w.months]
    complaints = rng.poisson(w.order_rate * sigmoid(-3.2 - 0.8 * h))
    rates = {
        "login": w.active * (2.0 + 16.0 * sigmoid(1.2 * h + 0.3)),
        "listing_change": w.active * 1.5 * np.exp(0.3 * h),
        "price_change": w.active * 2.0 * w.seasonal,
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
    return table(
        TABLES["behaviour_events"].arrow_schema,
        {
            "event_id": ids(len(cells)),
            "merchant_id": strings(merchant, w.merchant_ids),
            "event_at": ts(at),
            "event_type": strings(event_type, EVENT_TYPES),
            "value": pa.array(minutes, pa.float64(), mask=~is_response),
        },
    )
