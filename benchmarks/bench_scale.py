"""The engines at scale: the same flow on the local engine and on a Dask LocalCluster of 1 and 2 workers.

Each configuration runs in its own child process, through the real Prefect flow (`on_engine(ingest_flow)`,
the workspace's Prefect server started before the clock), into an empty workspace. A sampler thread in the
child reads every 0.2 s the resident memory and CPU time of the flow's process and of each Dask worker
process (the spawned children), so the figures are per process: peak RSS of the flow process and of the
largest worker, and CPU seconds summed over all of them (the scheduler runs in the flow's process).

Data: `$SCFRISK_BENCH_DATA/<batch>` (default `bench_data/` in the repository), from `bench_simulate`;
`python -m benchmarks.bench_scale [batch ...]`, default orders_10m.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import write_section

DATA = Path(os.environ.get("SCFRISK_BENCH_DATA", Path(__file__).resolve().parents[1] / "bench_data"))
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


def _run(source: str, home: str, engine: str, workers: str) -> None:
    """Child: one ingest flow run into an empty workspace; prints its figures as JSON."""
    from core.settings import ComputeConfig, Settings
    from pipelines.prefect_server import ensure_server, stop_server
    from pipelines.runtime import prepare_environment

    compute = ComputeConfig(engine=engine, n_workers=max(int(workers), 1))
    settings = Settings(home=Path(home), compute=compute)
    prepare_environment(settings)
    ensure_server(settings.home_dir)
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


def measure(batch: Path) -> list[dict]:
    import subprocess

    runs = []
    for engine, workers in ENGINES:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_scale", "run", str(batch), f"{tmp}/home", engine,
                 str(workers)], capture_output=True, text=True, check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} x{workers} failed:\n{proc.stderr[-3000:]}")
        run = {"engine": engine, "workers": workers, **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(json.dumps(run), flush=True)
        runs.append(run)
    return runs


def main(batches: list[str] | None = None) -> None:
    lines = []
    for name in batches or ["orders_10m"]:
        if not (DATA / name).is_dir():
            print(f"skip {name}: {DATA / name} missing (run benchmarks.bench_simulate first)")
            continue
        runs = measure(DATA / name)
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
    if not lines:
        return
    body = "\n".join([
        "`python -m benchmarks.bench_scale`: the ingest flow (read and split into month x merchant-bucket",
        "partitions, key checks across partitions, then Great Expectations validation and staging of each",
        "unit of partitions, commit) into an empty raw store, through Prefect, on the local engine and on a",
        "Dask LocalCluster of 1 and 2 worker processes (started inside the flow run, so its start-up counts).",
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
    write_section("Engines: local and Dask", body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        _run(*sys.argv[2:])
    else:
        main(sys.argv[1:] or None)
