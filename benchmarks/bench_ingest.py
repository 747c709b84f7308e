"""Ingest + validate throughput and peak memory at ~1M and ~10M orders, against a plain Parquet rewrite.

Baseline: read every table of the batch with pyarrow and write it back as Parquet (no validation, no
partitioning): the least any ingest must do. Each side runs in its own child process so the peak RSS is
its own. The ingest is `pipelines.ingest.ingest` (the body of the Prefect flow, without the temporary
API server's start-up). Data: `bench_data/orders_1m`, `bench_data/orders_10m` from `bench_simulate`.

The ingest is measured in the same run against the whole-table ingest it replaced (commit `BEFORE`: Delta
Lake store partitioned by month, each table read, validated and written whole in the flow's process), taken
with `git archive`, run by the same interpreter. The goal: the partitioned ingest (bounded memory, split,
checked and staged as tasks) costs at most 1.2x its CPU.

`engines` (its own section): the ingest flow of the 10M batch on the local engine and on a Dask
LocalCluster of 1 and 2 workers, each in its own child process, through the real Prefect flow
(`on_engine(ingest_flow)`, the workspace's Prefect server started before the clock). A sampler thread in
the child reads every 0.2 s the resident memory and CPU time of the flow's process and of each Dask worker
process (its spawned children), so the figures are per process: peak RSS of the flow's process and of the
largest worker, and CPU seconds summed over all of them (the scheduler runs in the flow's process).
Data: `$SCFRISK_BENCH_DATA/<batch>` (default `bench_data/` in the repository).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import run_measured, write_section

DATA = Path(os.environ.get("SCFRISK_BENCH_DATA", Path(__file__).resolve().parents[1] / "bench_data"))
DATASETS = {"orders_1m": 3, "orders_10m": 1}
"""Batch -> runs of each side: the median is reported (CPU seconds of a 1M run vary by +-20% here)."""
BEFORE = "87b5128"
"""The last whole-table ingest (memory grew with the batch: 3.1 GB at 10M orders)."""


def _baseline(source: str, out: str) -> None:
    """Child: plain read + write of every table; prints rows and seconds."""
    import pyarrow.parquet as pq

    from core.batch import locate_tables

    start, cpu, rows = time.perf_counter(), time.process_time(), 0
    for name, path in locate_tables(Path(source)).items():
        table = pq.read_table(path)
        rows += table.num_rows
        pq.write_table(table, Path(out) / f"{name}.parquet", compression="zstd")
        del table
    print(
        json.dumps({"rows": rows, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu})
    )


def _ingest(source: str, home: str) -> None:
    """Child: one full ingest into an empty workspace; prints rows and per-stage seconds."""
    from core.settings import Settings
    from pipelines.ingest import ingest
    from pipelines.runtime import prepare_environment

    settings = Settings(home=Path(home))
    prepare_environment(settings)
    import great_expectations  # noqa: F401  (import time is not ingest time)

    start, cpu = time.perf_counter(), time.process_time()
    result = ingest(Path(source), settings)
    total = {"total_s": time.perf_counter() - start, "total_cpu": time.process_time() - cpu}
    print(json.dumps({"rows": result.rows, "seconds": result.seconds, "cpu": result.cpu_seconds, **total}))


def _measure(dataset: Path, before: Path, stages: dict[str, str]) -> dict[str, float]:
    """Both sides on one batch; `stages` gets each side's CPU by stage (they differ: the ingest before the
    partitioned one read, validated and wrote table by table)."""
    with tempfile.TemporaryDirectory() as tmp:
        _, base_mb, out = run_measured(
            [sys.executable, "-m", "benchmarks.bench_ingest", "baseline", str(dataset), tmp]
        )
        base = json.loads(out.strip().splitlines()[-1])
    m = {"baseline_s": base["seconds"], "baseline_cpu": base["cpu"], "baseline_mb": base_mb}
    # -P: the old tree on PYTHONPATH wins over the working tree for the "before" side.
    for side, env in (("before", {"PYTHONPATH": str(before)}), ("delta", {})):
        with tempfile.TemporaryDirectory() as tmp:
            _, ingest_mb, out = run_measured(
                [sys.executable, "-P", "-m", "benchmarks.bench_ingest", "ingest", str(dataset), f"{tmp}/home"], env
            )
            run = json.loads(out.strip().splitlines()[-1])
        m.update({
            "orders": run["rows"]["orders"], "rows": sum(run["rows"].values()),
            f"{side}_s": run["total_s"], f"{side}_cpu": run["total_cpu"], f"{side}_mb": ingest_mb,
        })  # fmt: skip
        stages[side] = " / ".join(f"{stage} {cpu:.1f}" for stage, cpu in run["cpu"].items())
    return {**m, "load": os.getloadavg()[0]}


def _before_tree(tmp: str) -> Path:
    """The repository at `BEFORE`, unpacked into tmp."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", BEFORE], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    return Path(tmp)


def main() -> None:
    rows, goals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        before = _before_tree(tmp)
        for name in DATASETS:
            if not (DATA / name).is_dir():
                print(f"skip {name}: {DATA / name} missing (run benchmarks.bench_simulate first)")
                continue
            stages: dict[str, str] = {}
            runs = [_measure(DATA / name, before, stages) for _ in range(DATASETS[name])]
            m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            print(name, json.dumps(m))
            for side, label in (("before", f"whole tables ({BEFORE})"), ("delta", "partitioned")):
                rows.append(
                    f"| {m['orders']:,} | {m['rows']:,} | {label} | {m[f'{side}_s']:.1f} | {m[f'{side}_cpu']:.1f} | "
                    f"{stages[side]} (last run) | {m[f'{side}_mb']:,.0f} | {m['baseline_s']:.1f} | "
                    f"{m['baseline_cpu']:.1f} | {m['baseline_mb']:,.0f} | "
                    f"{m[f'{side}_cpu'] / m['baseline_cpu']:.1f}x | {m['load']:.1f} |"
                )
            ratio = m["delta_cpu"] / m["before_cpu"]
            goals.append(f"{m['orders']:,} orders: ingest {ratio:.2f}x the CPU of {BEFORE} ({_met(ratio <= 1.2)})")
            if name == "orders_10m":
                goals.append(f"peak {m['delta_mb']:,.0f} MB at 10M ({_met(m['delta_mb'] < 4096)})")
    if not rows:
        return
    body = "\n".join(
        [
            "`python -m benchmarks.bench_ingest`: a full ingest on the local engine (read, Great Expectations",
            "validation of every table, partitioned upsert into an empty Delta Lake raw store) of the simulator's",
            "~1M and ~10M-order batches, each in its own process (1M: median of 3 runs of each side, 10M: one",
            f"run), by the partitioned ingest and by the whole-table ingest it replaced (commit {BEFORE}).",
            "Baseline: pyarrow read + Parquet write of the same tables, same run. Ingest seconds are the whole",
            "call; the stage split is of the stages alone (before: read, validate and write table by table; now:",
            "split into partitions, key checks, partitions validated and staged, commit).",
            "CPU seconds (all threads) are the stable figure on this shared machine; wall seconds and the",
            "1-minute load average are shown for context.",
            "",
            (
                "| orders | rows (all tables) | raw store | ingest wall s | ingest CPU s | stages CPU s | peak MB | "
                "baseline wall s | baseline CPU s | baseline peak MB | ingest / baseline CPU | load |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            (
                "Goals (the partitioned ingest at most 1.2x the CPU of the whole-table one; peak < 4 GB at 10M "
                "orders): " + "; ".join(goals) + "."
            ),
            "",
            "What keeps validation cheap (core/validation.py): every rule first runs with a",
            "`BOOLEAN_ONLY` result in its cheapest exact form (ranges as min/max, foreign keys as a distinct",
            "count on a small key frame, ordered timestamp pairs as the minimum of a one-byte sign-of-gap",
            "column), and only failed rules are re-run row by row for the message; one GX asset per batch; GX's",
            "batch cache is cleared after each run (it keeps every frame for the life of the context",
            "otherwise); the validation page is written for a rejected batch. Between tables memory is",
            "handed back (`gc.collect` with the long-lived objects frozen, Arrow's pool, `malloc_trim`).",
        ]
    )
    print(body)
    write_section("Ingestion", body)


ENGINES = (("local", 0), ("dask", 1), ("dask", 2))
"""(engine, LocalCluster workers) measured for each batch."""


class _Sampler(threading.Thread):
    """Peak RSS and last CPU time of this process and of each Dask worker process below it."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.workers: set[int] = set()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.sample()

    def sample(self) -> None:
        import psutil

        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                if proc.pid != self.me.pid and "multiprocessing" not in " ".join(proc.cmdline()):
                    continue  # the Prefect server, not part of the run
                memory, times = proc.memory_info().rss, proc.cpu_times()
            except psutil.Error:
                continue
            self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), memory)
            self.cpu[proc.pid] = times.user + times.system
            if proc.pid != self.me.pid:
                self.workers.add(proc.pid)


def _engine_run(source: str, home: str, engine: str, workers: str) -> None:
    """Child: one ingest flow run into an empty workspace; prints its figures as JSON."""
    from core.settings import ComputeConfig, Settings
    from pipelines.prefect_server import ensure_server, stop_server
    from pipelines.runtime import prepare_environment

    compute = ComputeConfig(engine=engine, n_workers=max(int(workers), 1))
    settings = Settings(home=Path(home), compute=compute)
    prepare_environment(settings)
    ensure_server(settings.home_dir, settings.prefect)
    import great_expectations  # noqa: F401  (import time is not ingest time)

    from pipelines.compute import on_engine
    from pipelines.ingest import ingest_flow

    sampler = _Sampler()
    sampler.start()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        result = on_engine(ingest_flow, settings)(source=source, settings=settings)
        wall = time.perf_counter() - start
    finally:
        sampler.stopped.set()
        stop_server(settings.home_dir)
    sampler.sample()
    mine = time.process_time() - cpu
    worker_cpu = sum(sampler.cpu[pid] for pid in sampler.workers)
    print(json.dumps({
        "orders": result.rows.get("orders", 0), "rows": sum(result.rows.values()), "snapshot": result.snapshot_id,
        "wall": wall, "cpu": mine + worker_cpu, "flow_cpu": mine, "worker_cpu": worker_cpu,
        "flow_peak_mb": sampler.peak[sampler.me.pid] / 2**20,
        "worker_peak_mb": max((sampler.peak[p] for p in sampler.workers), default=0) / 2**20,
        "stages_cpu": result.cpu_seconds, "stages_s": result.seconds, "load": os.getloadavg()[0],
    }))  # fmt: skip


def measure_engines(batch: Path) -> list[dict]:
    """Child per engine configuration (`_run`); their figures, local first."""
    runs = []
    for engine, workers in ENGINES:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_ingest", "engine", str(batch), f"{tmp}/home", engine,
                 str(workers)], capture_output=True, text=True, check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} x{workers} failed:\n{proc.stderr[-3000:]}")
        run = {"engine": engine, "workers": workers, **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(json.dumps(run), flush=True)
        runs.append(run)
    return runs


def engines_main(batches: list[str] | None = None) -> None:
    """The section comparing the engines on the 10M batch (or the batches named)."""
    measured = []
    for name in batches or ["orders_10m"]:
        if not (DATA / name).is_dir():
            print(f"skip {name}: {DATA / name} missing (run benchmarks.bench_simulate first)")
            continue
        measured.append(measure_engines(DATA / name))
    if measured:
        write_engines_section(measured)


def write_engines_section(measured: list[list[dict]]) -> None:
    """The docs section from the runs of each batch (`measure_engines`: local first)."""
    lines = []
    for runs in measured:
        local = runs[0]
        for run in runs:
            label = "local" if run["engine"] == "local" else f"dask, {run['workers']} worker(s)"
            stages = run["stages_s"]
            lines.append(
                f"| {run['orders']:,} | {label} | {run['wall']:.0f} | {run['cpu']:.0f} | "
                f"{stages['split']:.0f} / {stages['keys']:.0f} / {stages['partitions']:.0f} | "
                f"{run['flow_peak_mb']:,.0f} | {run['worker_peak_mb']:,.0f} | "
                f"{local['wall'] / run['wall']:.2f}x | {run['cpu'] / local['cpu']:.2f}x | "
                f"{'same' if run['snapshot'] == local['snapshot'] else '**differs**'} | {run['load']:.1f} |"
            )
    body = "\n".join([
        "`python -m benchmarks.bench_ingest engines`: the ingest flow (the batch split into month x merchant-bucket",
        "partition files by one task per source piece, key checks across partitions by one task per table,",
        "then Great Expectations validation and staging of each unit of partitions, commit) into an empty raw",
        "store, through Prefect, on the local engine and on a Dask LocalCluster of 1 and 2 worker processes",
        "(started inside the flow run, so its start-up counts).",
        "CPU seconds are the flow's process plus every worker's; peak MB is resident memory, sampled every",
        "0.2 s, of the flow's process and of the largest worker. The machine has 2 cores shared with other",
        "jobs: the load (1-minute average at the end) says how much of the wall time was ours.",
        "",
        "| orders | engine | wall s | CPU s | split / keys / partitions wall s | flow peak MB | worker peak MB | "
        "speed-up (wall) | CPU vs local | snapshot | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *lines,
    ])  # fmt: skip
    print(body)
    write_section("Ingestion: local and Dask engines", body)


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "engines":
        engines_main(sys.argv[2:] or None)
    elif len(sys.argv) > 1:
        {"baseline": _baseline, "ingest": _ingest, "engine": _engine_run}[sys.argv[1]](*sys.argv[2:])
    else:
        main()
        engines_main()
