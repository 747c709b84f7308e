"""A whole platform: chunks of merchants simulated one at a time, their keys made global, parts written."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from core.schemas import TABLES, UPDATED_AT
from simulator import finance, orders
from simulator.config import OUTCOME_MONTHS, SimulationConfig
from simulator.merchants import World, merchants
from simulator.oracle import ORACLE_DIR, ORACLE_SCHEMAS, merchant_health
from simulator.timeline import as_of

log = logging.getLogger(__name__)

ID_COLUMNS = ("order_id", "event_id", "receipt_id", "receivable_id", "application_id", "loan_id", "record_id")
"""Int64 keys: each chunk numbers from 1 and the writer shifts them past the previous chunks'."""


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


def simulate_chunk(config: SimulationConfig, chunk: int) -> dict[str, pa.Table]:
    """All tables for one chunk of merchants as of the window end, int64 keys numbered from 1 within the chunk.

    The order of the draws below is part of the output: reordering them changes every table.
    """
    rng = np.random.default_rng([config.seed, chunk])
    first = chunk * config.chunk_size
    n = min(config.chunk_size, config.n_merchants - first)
    world = World(config, rng, first, n)
    applications, loans, performance, truth = finance.loans(world)
    lives = {
        "merchants": merchants(world),
        "orders": orders.orders(world),
        "behaviour_events": orders.behaviour_events(world),
        "inventory_receipts": finance.inventory_receipts(world),
        "receivables": finance.receivables(world),
        "loan_applications": applications,
        "loans": loans,
        "loan_performance": performance,
        f"{ORACLE_DIR}/loans": truth,
        f"{ORACLE_DIR}/merchant_health": merchant_health(world),
    }
    end = int(config.end.astype(np.int64))
    return {name: as_of(name, t, end) if name in TABLES else t for name, t in lives.items()}


def _write(table: pa.Table, path: Path) -> None:
    """Delta-encode keys and timestamps (sorted per merchant, so deltas are small): a third smaller files.
    Not `updated_at`, which jumps back and forth along a merchant's rows (plain is a quarter smaller)."""
    delta = [
        f.name for f in table.schema
        if f.name in ID_COLUMNS or (pa.types.is_timestamp(f.type) and f.name != UPDATED_AT)
    ]
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
