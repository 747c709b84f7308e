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

from core.errors import ScfriskError
from core.schemas import TABLES, UPDATED_AT
from simulator import finance, orders
from simulator.arrays import DAY
from simulator.config import OUTCOME_MONTHS, SimulationConfig
from simulator.merchants import World, merchants
from simulator.oracle import ORACLE_DIR, ORACLE_SCHEMAS, merchant_health
from simulator.timeline import as_of, day_changes

log = logging.getLogger(__name__)

BASE = "base"
DAILY = "daily"
"""Folders of a daily run under its output: the first day's state, and one batch a day."""
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
    days: int = 0
    base_rows: dict[str, int] = field(default_factory=dict)
    daily_rows: dict[str, int] = field(default_factory=dict)
    """Rows in all daily batches: each day's new rows and older rows whose state changed that day."""

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
        if self.days:
            first = last_day - np.timedelta64(self.days - 1, "D")
            lines += [
                f"  written day by day: {self.out / BASE} as of {first} 00:00, then {self.days} daily batches "
                f"{self.out / DAILY}/{first} .. {last_day}",
                *(
                    f"  {name:<20} {self.base_rows[name]:>12,} in the base, {self.daily_rows[name]:>9,} "
                    f"new or changed in the days"
                    for name in TABLES
                ),
            ]
        return "\n".join(lines)


def simulate_platform(config: SimulationConfig, out: Path | str, days: int = 0) -> SimulationSummary:
    """Write every raw table (and the oracle) as `out/<table>/part-NNNNN.parquet`, one part per chunk.

    With `days`, the same history as the platform wrote it over the window's last `days` days: the base,
    `out/base/<table>/`, as of the first of those days (midnight UTC), then one batch a day,
    `out/daily/YYYY-MM-DD/<table>/`, with every row written or changed that day as it stands at the day's
    end (`simulator.timeline`). A table without rows is left out of its batch, and a day without any has
    no folder (only tiny platforms have such days). The oracle stays in `out/oracle/`. The world is
    simulated once and each chunk cut into days, so the days cost a pass over the rows they hold, not a
    simulation each.
    """
    out = Path(out)
    started = time.perf_counter()
    end = int(config.end.astype(np.int64))
    first_day = _first_day(config, days)
    day_folders = {day: out / DAILY / _day_name(day) for day in range(first_day, end, DAY)} if days else {}
    _clear(out, [out / BASE, *day_folders.values(), *sorted((out / DAILY).glob("*"))] if days else [out])
    summary = SimulationSummary(config=config, out=out, days=days)
    next_id = dict.fromkeys(ID_COLUMNS, 0)
    with Progress(transient=True) as progress:
        task = progress.add_task("simulating merchants", total=config.n_merchants)
        for chunk in range(config.n_chunks):
            part = f"part-{chunk:05d}.parquet"
            tables = _shift_ids(simulate_chunk(config, chunk), next_id)
            summary.add(tables)
            for name, table in tables.items():
                if name not in TABLES or not days:
                    _write(table, out / name / part)
                    continue
                batches = [(out / BASE, as_of(name, table, first_day))]
                batches += [(day_folders[day], rows) for day, rows in day_changes(name, table, first_day, end)]
                for folder, rows in batches:
                    if rows.num_rows:
                        _write(rows, folder / name / part)
                    counts = summary.base_rows if folder.name == BASE else summary.daily_rows
                    counts[name] = counts.get(name, 0) + rows.num_rows
            progress.advance(task, tables["merchants"].num_rows)
    summary.seconds = time.perf_counter() - started
    log.info("simulation written to %s in %.1f s", out, summary.seconds)
    return summary


def _first_day(config: SimulationConfig, days: int) -> int:
    """Midnight (epoch seconds) of the first daily batch: `days` days before the window end."""
    end = config.end.astype(np.int64)
    window_days = int((end - config.first_month.astype("datetime64[s]").astype(np.int64)) // DAY)
    if not 0 <= days < window_days:
        raise ScfriskError(
            f"days must be between 1 and {window_days - 1} (the window has {window_days} days), got {days}"
        )
    return int(end) - days * DAY


def _day_name(day: int) -> str:
    return str(np.datetime64(day, "s").astype("datetime64[D]"))


def _clear(out: Path, roots: list[Path]) -> None:
    """Remove the part files an earlier run left in the table folders under `roots` and the oracle's, so
    every folder written holds this run's parts only (and no day of a longer earlier run is left over)."""
    folders = [*(root / name for root in roots for name in TABLES),
               *(out / ORACLE_DIR / name for name in ORACLE_SCHEMAS)]
    for folder in folders:
        for stale in folder.glob("part-*.parquet"):
            stale.unlink()
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for root in roots:
        if root != out and root.is_dir() and not any(root.iterdir()):
            root.rmdir()


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
    """Write one part, making its folder. Delta-encode keys and timestamps (sorted per merchant, so deltas are
    small): a third smaller files. Not `updated_at`, which jumps back and forth along a merchant's rows
    (plain is a quarter smaller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
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
