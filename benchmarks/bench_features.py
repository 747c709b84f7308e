"""Point-in-time training set for 100k applications over ~10M orders, against a plain pandas baseline.

Data: the simulator's `bench_data/orders_10m` (made by `bench_simulate`, or here with the same command),
read in place through its folder layout. Each measured step runs in its own process for its peak RSS:
  * DuckDB, all features, 100k applications (the goal: < 60 s, < 4 GB on 2 cores);
  * baseline: a straightforward pandas version (merge on merchant, mask by as_of, groupby per entity) of
    five representative features, on a sample of the applications, next to DuckDB computing the same
    five features for the same sample; the ratio compares equal work.
Then the online store: materialise all merchants as of the end of the data, load it, time 100k lookups.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from benchmarks.bench_simulate import BENCH_DATA, SIZES, command
from benchmarks.common import run_measured, write_section
from pipelines.raw_store import RawStore

DATASET = "orders_10m"
N_APPLICATIONS = 100_000
N_BASELINE = N_APPLICATIONS
N_LOOKUPS = 100_000
SEED = 42
SUBSET = ("net_sales_30d", "net_sales_90d", "orders_90d", "refund_rate_90d", "unique_buyers_90d")


class SimulatorFolder(RawStore):
    """The simulator's `<table>/part-*.parquet` layout seen as a raw store (no manifest: never reused)."""

    def table_glob(self, name: str) -> str:
        return str(self.table_dir(name) / "*.parquet")

    def has_table(self, name: str) -> bool:
        return any(self.table_dir(name).glob("*.parquet"))


def applications(store: RawStore, n: int) -> pd.DataFrame:
    frame = duckdb.connect().execute(
        f"SELECT application_id, merchant_id, applied_at AS as_of, product "
        f"FROM read_parquet('{store.table_glob('loan_applications')}')"
    ).df()
    return frame.sample(n=min(n, len(frame)), random_state=SEED).reset_index(drop=True)


def pandas_baseline(store: RawStore, entities: pd.DataFrame) -> pd.DataFrame:
    """The five SUBSET features the obvious pandas way: every order of the merchant against every as_of."""
    orders = pd.read_parquet(
        store.table_dir("orders"),
        columns=["merchant_id", "buyer_id", "ordered_at", "amount", "cancelled_at", "refunded_at"],
    )
    orders = orders[orders["merchant_id"].isin(entities["merchant_id"].unique())]
    joined = entities[["merchant_id", "as_of"]].drop_duplicates().merge(orders, on="merchant_id")
    age = joined["as_of"] - joined["ordered_at"]
    joined = joined[(age > pd.Timedelta(0)) & (age <= pd.Timedelta(days=90))].copy()
    cancelled = joined["cancelled_at"] < joined["as_of"]
    refunded = joined["refunded_at"] < joined["as_of"]
    joined["net"] = joined["amount"].where(~(cancelled | refunded), 0.0)
    joined["net30"] = joined["net"].where(joined["as_of"] - joined["ordered_at"] <= pd.Timedelta(days=30), 0.0)
    joined["refunded"] = refunded.astype(float)
    grouped = joined.groupby(["merchant_id", "as_of"])
    return pd.DataFrame(
        {
            "net_sales_30d": grouped["net30"].sum(),
            "net_sales_90d": grouped["net"].sum(),
            "orders_90d": grouped.size(),
            "refund_rate_90d": grouped["refunded"].mean(),
            "unique_buyers_90d": grouped["buyer_id"].nunique(),
        }
    ).reset_index()


def child(step: str, data: str, out: str) -> None:
    """One measured step in its own process; prints its figures as JSON."""
    from features.definitions import feature
    from features.training_set import compute_features, get_training_set, normalise_entities, table_readers

    store = SimulatorFolder(data)
    n = N_APPLICATIONS if step == "full" else N_BASELINE
    entities = applications(store, n)
    start, cpu_start = time.perf_counter(), time.process_time()
    if step == "full":
        result = get_training_set(entities, store)
    elif step == "duckdb_subset":
        result = compute_features(
            normalise_entities(entities), table_readers(store), features=tuple(feature(f) for f in SUBSET)
        )
    else:
        result = pandas_baseline(store, normalise_entities(entities))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result.to_parquet(out)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rows": len(result), "columns": result.shape[1]}))


def measure(step: str, data: Path, out: Path) -> dict[str, float]:
    wall, peak_mb, stdout = run_measured([sys.executable, "-m", "benchmarks.bench_features", step, str(data), str(out)])
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall": wall, "peak_mb": peak_mb}


def online_latency(data: Path, home: Path) -> dict[str, float]:
    from features.offline_store import OfflineStore, month_starts
    from features.online_store import OnlineStore, publish_online

    store = SimulatorFolder(data)
    offline = OfflineStore(home / "features", store)
    as_of = month_starts(store)[-1]
    start = time.perf_counter()
    publish_online(offline, as_of)
    materialize_s = time.perf_counter() - start
    start = time.perf_counter()
    online = OnlineStore.load(offline.root)
    load_s = time.perf_counter() - start
    ids = np.random.default_rng(SEED).choice(online.merchant_ids, size=N_LOOKUPS)
    times = np.empty(N_LOOKUPS)
    for i, merchant in enumerate(ids):
        t0 = time.perf_counter_ns()
        online.lookup(merchant)
        times[i] = time.perf_counter_ns() - t0
    return {
        "merchants": len(online), "materialize_s": materialize_s, "load_s": load_s,
        "p50_us": float(np.percentile(times, 50)) / 1e3, "p99_us": float(np.percentile(times, 99)) / 1e3,
    }  # fmt: skip


def row(label: str, m: dict[str, float], n_features: int) -> str:
    return (
        f"| {label} | {m['rows']:,} | {n_features} | {m['seconds']:.1f} | {m['cpu']:.1f} | {m['wall']:.1f} "
        f"| {m['peak_mb']:,.0f} |"
    )


def main(data: Path | None = None) -> None:
    data = data or BENCH_DATA / DATASET
    if not (data / "orders").is_dir():
        subprocess.run(command(DATASET, SIZES[DATASET]), check=True)
    orders = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{data}/orders/*.parquet')").fetchone()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        full = measure("full", data, tmp_path / "full.parquet")
        subset = measure("duckdb_subset", data, tmp_path / "subset.parquet")
        baseline = measure("pandas", data, tmp_path / "pandas.parquet")
        keys = ["merchant_id", "as_of"]
        ours = pd.read_parquet(tmp_path / "subset.parquet").set_index(keys).sort_index()
        theirs = pd.read_parquet(tmp_path / "pandas.parquet").set_index(keys).reindex(ours.index)
        theirs = theirs.fillna({c: 0.0 for c in SUBSET if c != "refund_rate_90d"})
        agree = bool(np.allclose(ours[list(SUBSET)], theirs[list(SUBSET)], equal_nan=True))
        online = online_latency(data, tmp_path)
    ratio = baseline["seconds"] / subset["seconds"]
    cpu_ratio = baseline["cpu"] / subset["cpu"]
    body = f"""
Data: `bench_data/{data.name}` ({orders:,} orders), {full['rows']:,} applications sampled with seed {SEED}.
Each step runs in its own process; peak RSS is that process's.

| step | rows | features | compute s | CPU s | wall s (incl. start-up) | peak RSS MB |
|---|---|---|---|---|---|---|
{row("DuckDB, all features", full, full['columns'] - 4)}
{row("DuckDB, 5-feature subset", subset, 5)}
{row("pandas baseline, same 5 features", baseline, 5)}

Baseline: merge every order of the merchant with every as_of, mask by as_of, groupby per entity
(`{', '.join(SUBSET)}`) on the same applications. **DuckDB is {ratio:.1f}x faster on the same work**
({cpu_ratio:.1f}x less CPU); results agree: {agree}. Goal: 100k applications in < 60 s and < 4 GB on 2 cores.
CPU seconds are reported because the 2-core machine may be shared while the benchmark runs.

Online store: materialising {online['merchants']:,} merchants took {online['materialize_s']:.1f} s, loading
{online['load_s']:.2f} s; {N_LOOKUPS:,} lookups p50 {online['p50_us']:.1f} us, p99 {online['p99_us']:.1f} us.
"""
    print(body)
    write_section("Feature store", body)


if __name__ == "__main__":
    if len(sys.argv) == 4:
        child(*sys.argv[1:])
    else:
        main(Path(sys.argv[1]) if len(sys.argv) == 2 else None)
