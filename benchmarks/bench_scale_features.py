"""Features and training of the 10M-order batch on the local engine and on Dask with 1 and 2 workers.

Needs an ingested raw store of `bench_data/orders_10m` (`--raw`; by default one is ingested into a temporary
workspace first). Each step runs in its own process; on Dask it starts a LocalCluster of its own (one
thread per worker process) and maps the per-bucket work with the client directly, so the figures are the
engine's, without Prefect's task records (the flows add those). Features: the training set and the
snapshot of the last month, per merchant bucket. Training: `train_pd_model` on that training set, in the
process (local) or data-parallel on the workers (`models.distributed`, early-stopped on every worker), 2
candidates of at most 300 rounds on every engine. Figures per process: CPU seconds (user + system), peak
RSS; a worker's are read from the worker itself at the end of the step.

    python -m benchmarks.bench_scale_features [dataset name or folder (default orders_10m)] [--raw <its raw store>]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_simulate import BENCH_DATA
from benchmarks.common import run_measured, write_section

DATASET = "orders_10m"
ENGINES = {"local": 0, "dask, 1 worker": 1, "dask, 2 workers": 2}
ROUNDS, TRIALS = 300, 2


def usage() -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of the calling process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime, own.ru_maxrss / 1024


def child(step: str, raw: str, out: str, workers: int) -> None:
    """One step on one engine, in its own process; prints its figures as JSON."""
    import pandas as pd

    from core.raw_store import RawStore
    from features.offline_store import OfflineStore, in_turn, month_starts

    client = cluster = None
    map_parts = in_turn
    if workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, memory_limit="6GiB")
        client = Client(cluster)

        def map_parts(fn: Any, items: list[Any], label: str) -> list[Any]:
            return client.gather(client.map(fn, items, pure=False))

    start, cpu = time.perf_counter(), time.process_time()
    figures: dict[str, Any] = {}
    if step == "features":
        store = RawStore(raw)
        offline = OfflineStore(Path(out), store, map_parts)
        path = offline.training_set(12)
        offline.materialize(month_starts(store)[-1])
        figures["rows"] = len(pd.read_parquet(path, columns=["application_id"]))
    else:
        train(Path(out), client, figures)
    figures |= {"seconds": time.perf_counter() - start, "driver_cpu": time.process_time() - cpu}
    if client is not None:
        figures["workers"] = list(client.run(usage).values())
        client.close()
        cluster.close()
    print(json.dumps(figures))


def train(feature_store: Path, client: Any, figures: dict[str, Any]) -> None:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from features.catalogue import PROTECTED_PROXIES
    from features.definitions import FEATURES, feature_names
    from features.offline_store import ENTITY_COLUMNS
    from models.splits import time_split
    from models.training import binary_target, infer_features, train_pd_model

    frame = pd.read_parquet(next(feature_store.rglob("training_set_h12.parquet")))  # as `training_frame`
    frame = frame.loc[frame["outcome_complete"], [*ENTITY_COLUMNS, *feature_names()]].reset_index(drop=True)
    y = binary_target(frame["defaulted"])
    slices = time_split(frame["as_of"], 2, 2)
    drop = {*ENTITY_COLUMNS, *PROTECTED_PROXIES}
    features = infer_features(frame[slices == "train"], drop, {f.name: f.direction for f in FEATURES},
                              {f.name: f.kind for f in FEATURES})
    result = train_pd_model(frame, y, slices, features, seed=42, max_rounds=ROUNDS, search_trials=TRIALS,
                            client=client)
    test = (slices == "test").to_numpy()
    auc = roc_auc_score(y[test], result.model.predict_pd(frame[test]))
    figures |= {"rows": int((~test).sum()), "oot_auc": float(auc)}


def measure(step: str, raw: Path | str, out: Path, workers: int) -> dict[str, Any]:
    wall, peak_mb, stdout = run_measured(
        [sys.executable, "-m", "benchmarks.bench_scale_features", step, str(raw), str(out), str(workers)])
    figures = json.loads(stdout.strip().splitlines()[-1])
    return {**figures, "wall": wall, "peak_mb": peak_mb}


def ingested(tmp: Path, dataset: str) -> str:
    from core.settings import Settings
    from pipelines.ingest import ingest

    settings = Settings(home=tmp / "home", policy_file=Path(__file__).resolve().parents[1] / "policy.toml")
    ingest(Path(dataset) if Path(dataset).is_dir() else BENCH_DATA / dataset, settings)
    return settings.store_url("raw_store")


def row(step: str, engine: str, m: dict[str, Any], local: dict[str, Any]) -> str:
    workers = m.get("workers", [])
    cpu = m["driver_cpu"] + sum(w[0] for w in workers)
    per_worker = " / ".join(f"{w[0]:.0f} s, {w[1]:,.0f} MB" for w in workers) or "-"
    auc = f" | {m['oot_auc']:.4f}" if "oot_auc" in m else " | -"
    return (f"| {step} | {engine} | {m['rows']:,} | {m['wall']:.0f} | {local['wall'] / m['wall']:.2f} | {cpu:.0f} "
            f"| {m['driver_cpu']:.0f} | {m['peak_mb']:,.0f} | {per_worker}{auc} |")


def main(dataset: str = DATASET, raw: Path | str | None = None) -> None:
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        raw = raw or ingested(tmp_path, dataset)
        results: dict[str, dict[str, dict[str, Any]]] = {"features": {}, "training": {}}
        for engine, workers in ENGINES.items():
            out = tmp_path / f"features_{workers}"
            results["features"][engine] = measure("features", raw, out, workers)
            results["training"][engine] = measure("train", raw, out, workers)
            print(engine, results["features"][engine], results["training"][engine], flush=True)
    load_after = os.getloadavg()
    for step, by_engine in results.items():
        rows += [row(step, engine, m, by_engine["local"]) for engine, m in by_engine.items()]
    table = "\n".join(rows)
    write_section("Features and training: local engine and Dask (bench_scale_features)", f"""
Raw store: `bench_data/{Path(dataset).name}` ingested. Features = the training set (every loan as of its
application) and the snapshot of the last month, per merchant bucket; the three engines' files are
bit-equal (`tests/test_dask_engine.py` checks it on the sample). Training = `train_pd_model` on that
training set, {TRIALS} candidates of at most {ROUNDS} rounds. Each step in its own process; a Dask step starts
its own LocalCluster (one thread per worker) and maps buckets with the client (Prefect's task records,
which the flows add, not included). CPU = driver + workers, user + system. Load average (1 min) of the
2-core machine: {load_before[0]:.1f} before, {load_after[0]:.1f} after; other jobs share it, so **CPU seconds
are the stable figure** and wall time (and so the speed-up) depends on the load.

| step | engine | rows | wall s | speed-up | CPU s (all) | driver CPU s | peak MB, largest process | per worker: CPU s, MB | OOT AUC |
|---|---|---|---|---|---|---|---|---|---|
{table}
""")


if __name__ == "__main__":
    if len(sys.argv) == 5:
        child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        args = sys.argv[1:]
        raw_path = Path(args[args.index("--raw") + 1]) if "--raw" in args else None
        main(next((a for a in args if not a.startswith("--") and Path(a) != raw_path), DATASET), raw_path)
