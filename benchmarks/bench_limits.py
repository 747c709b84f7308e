"""Limit engine on 1M merchant-product rows (250k merchants x 4 products): wall time and peak memory.

Baseline: the same policy applied row by row in plain Python (the obvious first implementation), run
on a subsample and extrapolated linearly to 1M rows; its limits must equal the engine's.
"""

from __future__ import annotations

import logging
import math
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import self_peak_mb, write_section
from credit.limits import compute_limits
from credit.policy import CreditPolicy, ProductPolicy, load_policy
from testkit.synthetic import limit_inputs

log = logging.getLogger("bench_limits")

POLICY_FILE = Path(__file__).resolve().parents[1] / "policy.toml"
MERCHANTS = 250_000
BASELINE_MERCHANTS = 5_000
GOAL_SECONDS = 5.0
SEED = 7


def _base(row: dict, terms: ProductPolicy) -> float:
    base = terms.base
    if base.kind == "unsettled_orders":
        return row["unsettled_order_value"]
    if base.kind == "eligible_receivables":
        excess = min(max(row["receivables_top_counterparty_share"] - base.max_counterparty_share, 0.0), 1.0)
        return row["open_receivables_current"] * (1.0 - excess)
    if base.kind == "warehouse_inventory":
        return row["inventory_value_in_warehouse"] * (
            1.0 - base.haircuts.get(row["category"], base.default_haircut)
        )
    return base.months_of_sales * row["net_sales_90d"] / 3.0


def limit_row_by_row(merchants: pd.DataFrame, policy: CreditPolicy) -> list[float]:
    """The baseline: one Python loop iteration per merchant and product."""
    names = policy.master_scale.names
    limits = []
    for terms in policy.products.values():
        for row in merchants.to_dict("records"):
            grade = names[int(policy.master_scale.grade_index(np.array([row["pd"]]))[0])]
            if (
                row["segment"] not in terms.segments
                or not row["tenure_days"] >= terms.min_tenure_days
                or not row["net_sales_90d"] >= terms.min_net_sales_90d
                or grade not in terms.advance_rate
            ):
                limits.append(0.0)
                continue
            p = terms.pricing
            if p.funding_rate + row["pd"] * terms.lgd + p.operating_rate + p.margin > p.max_apr:
                limits.append(0.0)
                continue
            el_cap = terms.el_budget / (row["pd"] * terms.lgd * terms.ccf) if row["pd"] > 0 else math.inf
            raw = min(
                terms.max_limit,
                terms.max_sales_share * row["net_sales_90d"],
                _base(row, terms) * terms.advance_rate[grade],
                el_cap,
            )
            limit = math.floor(raw / terms.round_to) * terms.round_to
            limits.append(limit if limit >= max(terms.min_limit, terms.round_to) else 0.0)
    return limits


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policy = load_policy(POLICY_FILE)
    merchants = limit_inputs(MERCHANTS, SEED)
    rows = MERCHANTS * len(policy.products)

    compute_limits(merchants.head(1000), policy)  # warm-up: imports and first-call costs
    start = time.perf_counter()
    limits = compute_limits(merchants, policy)
    vectorised = time.perf_counter() - start
    assert len(limits) == rows
    del limits
    tracemalloc.start()  # a separate run: tracing slows allocation down, so it never overlaps the timing
    compute_limits(merchants, policy)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    sample = merchants.head(BASELINE_MERCHANTS)
    start = time.perf_counter()
    baseline_limits = limit_row_by_row(sample, policy)
    baseline_sample = time.perf_counter() - start
    sample_rows = BASELINE_MERCHANTS * len(policy.products)
    baseline = baseline_sample * rows / sample_rows
    expected = compute_limits(sample, policy)["limit"].to_numpy()
    agree = bool(np.array_equal(np.asarray(baseline_limits), expected))

    figures = {
        "rows": rows,
        "vectorised_s": vectorised,
        "rows_per_s": rows / vectorised,
        "traced_peak_mb": traced_peak / 2**20,
        "process_peak_rss_mb": self_peak_mb(),
        "baseline_sample_rows": sample_rows,
        "baseline_sample_s": baseline_sample,
        "baseline_extrapolated_s": baseline,
        "speedup": baseline / vectorised,
    }
    for key, value in figures.items():
        log.info("%-24s %s", key, f"{value:,.3f}" if isinstance(value, float) else f"{value:,}")
    log.info(
        "baseline limits equal the engine's on the sample: %s; goal < %.0f s: %s",
        agree,
        GOAL_SECONDS,
        "met" if vectorised < GOAL_SECONDS else "MISSED",
    )

    write_section(
        "Credit limits",
        f"""
`python -m benchmarks.bench_limits`: `credit.limits.compute_limits` on {MERCHANTS:,} synthetic merchants x
{len(policy.products)} products = **{rows:,} merchant-product rows** (eligibility, limit, binding constraint,
EL, APR, expected profit), against a row-by-row Python loop applying the same policy.

| measure | value |
|---|---|
| vectorised engine, 1M rows | **{vectorised:.2f} s** ({rows / vectorised:,.0f} rows/s; goal < {GOAL_SECONDS:.0f} s: {"met" if vectorised < GOAL_SECONDS else "missed"}) |
| peak memory allocated by the engine (tracemalloc) | {traced_peak / 2**20:,.0f} MB |
| peak RSS of the whole benchmark process | {self_peak_mb():,.0f} MB |
| row-by-row baseline, measured on {sample_rows:,} rows | {baseline_sample:.2f} s |
| row-by-row baseline, **extrapolated** linearly to {rows:,} rows | {baseline:,.0f} s |
| speed-up of the engine over the baseline | **{baseline / vectorised:,.0f}x** |

The baseline was run on a {BASELINE_MERCHANTS:,}-merchant subsample only and extrapolated (it scales
linearly: one iteration per row); its limits {"equal" if agree else "DIFFER FROM"} the engine's on that sample.
""",
    )


if __name__ == "__main__":
    main()
