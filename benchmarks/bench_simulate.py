"""Simulator throughput and peak memory at ~1M and ~10M orders (and ~10M from ten times larger sellers);
leaves the data in bench_data/ for reuse.

Each size runs `scfrisk simulate` in its own process (its peak RSS and CPU seconds). Baseline: re-writing the
very same rows with plain pyarrow (read every part, write it back zstd-compressed), i.e. the Parquet I/O
floor any generator of these files pays; the ratio says how much generation costs on top of it.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import run_measured, write_section
from core.schemas import TABLES

BENCH_DATA = Path(__file__).resolve().parents[1] / "bench_data"
MONTHS = 24
SEED = 42
SIZES = {"orders_1m": 3_900, "orders_10m": 39_000, "orders_10m_dense": 3_900}
"""Folder under bench_data/ -> merchants; ~10.7 orders per merchant-month over 24 months, but `DENSE`."""
DENSE = {"orders_10m_dense": 100.0}
"""Folder -> orders per merchant-month: larger sellers (`bench_refresh` measures what that changes)."""


def command(folder: str, merchants: int) -> list[str]:
    density = ["--orders-per-month", str(DENSE[folder])] if folder in DENSE else []
    return [
        sys.executable, "-m", "pipelines.cli", "simulate", "--merchants", str(merchants), *density,
        "--months", str(MONTHS), "--seed", str(SEED), "--out", str(BENCH_DATA / folder),
    ]  # fmt: skip


def rows(folder: Path) -> dict[str, int]:
    return {
        name: sum(pq.read_metadata(p).num_rows for p in (folder / name).glob("part-*.parquet"))
        for name in TABLES
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rewrite_cpu_seconds(folder: Path) -> float:
    """Baseline: read every raw table's parts and write them back, as plain pyarrow would (CPU seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.process_time()
        for name in TABLES:
            for part in sorted((folder / name).glob("part-*.parquet")):
                pq.write_table(pq.read_table(part), Path(tmp) / f"{name}-{part.name}", compression="zstd")
        return time.process_time() - start


def main() -> None:
    BENCH_DATA.mkdir(exist_ok=True)
    lines = [
        (
            "| dataset | merchants x months | orders | all rows | wall s | CPU s | orders per CPU s | rows per CPU s "
            "| peak RSS MB | pyarrow rewrite CPU s | simulate / rewrite CPU |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder, merchants in SIZES.items():
        out = BENCH_DATA / folder
        if out.exists():
            shutil.rmtree(out)
        cpu_before = children_cpu()
        wall, peak_mb, _ = run_measured(command(folder, merchants))
        cpu = children_cpu() - cpu_before
        counts = rows(out)
        total, orders = sum(counts.values()), counts["orders"]
        baseline = rewrite_cpu_seconds(out)
        print(
            f"{folder}: {merchants:,} merchants, {orders:,} orders, {total:,} rows; wall {wall:.1f} s, "
            f"CPU {cpu:.1f} s ({orders / cpu:,.0f} orders/CPU s, {total / cpu:,.0f} rows/CPU s), "
            f"peak {peak_mb:,.0f} MB; pyarrow rewrite {baseline:.1f} CPU s (simulate x{cpu / baseline:.2f})"
        )
        lines.append(
            f"| `bench_data/{folder}` | {merchants:,} x {MONTHS} | {orders:,} | {total:,} | {wall:.1f} | {cpu:.1f} "
            f"| {orders / cpu:,.0f} | {total / cpu:,.0f} | {peak_mb:,.0f} | {baseline:.1f} | {cpu / baseline:.2f} |"
        )
    load = os.getloadavg()[0]
    body = "\n".join(
        [
            (
                "`scfrisk simulate --merchants N --months 24 --seed 42 --out bench_data/<dataset>`, each size in its "
                "own process (wall time includes start-up; peak RSS of that process). All rows = every raw "
                "table (orders, events, receipts, receivables, applications, loans, performance). Baseline: "
                "re-writing the same rows with plain pyarrow (read + zstd write), the Parquet I/O floor. CPU "
                "seconds (user + system) are the stable figure: the machine is shared, wall time depends on its "
                f"load (1-minute load average at the end of this run: {load:.1f} on {os.cpu_count()} cores)."
            ),
            "",
            *lines,
            "",
            (
                f"Peak memory is set by the chunk (5,000 merchants), not by the dataset: {peak_mb:,.0f} MB at "
                f"{orders:,} orders (goal < 4 GB at 10M orders: {'met' if peak_mb < 4096 else 'NOT met'}). "
                "The datasets stay in `bench_data/` (git-ignored) for the other benchmarks."
            ),
        ]
    )
    write_section("Simulator", body)


if __name__ == "__main__":
    main()
