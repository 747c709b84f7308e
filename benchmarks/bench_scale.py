"""Scale-out: the pipeline's stages (ingest -> features -> train -> limits) at 1M, 10M and 100M orders, on
the local engine and on Dask LocalClusters, with the memory of every worker process.

Each stage is its own `scfrisk` command in its own process, as a user runs it, in a new workspace under
`bench_data/ws_scale_*` with the workspace's Prefect server started beforehand (not counted). The engine is
set by environment: `SCFRISK_COMPUTE__ENGINE`, `__N_WORKERS`, `__MEMORY_LIMIT` (4GiB per worker).

Measured per stage: wall seconds; CPU seconds of the whole process tree (the command and its Dask worker
processes: the rusage of children reaped, which includes grandchildren that their parents waited for);
peak RSS of the command's own process (driver) and of each Dask worker process (psutil, sampled every
0.5 s: a peak shorter than that can be missed); the 1-minute load average during the stage (mean of the
samples). The machine is shared, so CPU seconds and ratios in one run are the figures to compare.

Results are kept as one JSON file per run in `bench_data/scale_results/` and written after every stage, so
a run that stops (or is still going) leaves what it measured; `report` writes docs/benchmarks.md's
section from those files only.

    python -m benchmarks.bench_scale run orders_100m dask 2 --keep   # one run (hours at 100M on a loaded machine)
    python -m benchmarks.bench_scale run orders_100m dask 2 --resume # go on from the first stage not done
    python -m benchmarks.bench_scale run orders_10m dask 2 --raw <raw store>   # features on: an ingested store
    python -m benchmarks.bench_scale engines orders_10m        # one ingest, then local, dask x1, x2 side by side
    python -m benchmarks.bench_scale report                    # the docs section from the results so far
    python -m benchmarks.bench_scale                           # every run of the section, then the report
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from benchmarks.common import write_section

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCFRISK_BENCH_DATA", "/work/bench_data"))
RESULTS = DATA / "scale_results"
TITLE = "Scale-out (Dask engine)"
SCALING_DOC = ROOT / "docs" / "scaling.md"
TARGET_ORDERS, TARGET_MERCHANTS = 1_000_000_000, 10_000_000
WORKER_COUNTS = (16, 64, 256)
BY_ORDERS = {"ingest"}
"""Stages whose cost follows the rows delivered; the others follow the merchants (their feature rows, scores
and limits are per merchant and month), which grow faster than the orders at the target (10M merchants)."""
MEMORY_LIMIT = "4GiB"
DASK_WORKAROUND = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "600s"}
"""Dask calls a connection dead after 30 s without an answer (`distributed.comm.timeouts.tcp`). On this machine
(load 25-40 on 2 cores) a worker running a `features build` task went that long without answering: the
scheduler dropped it, the worker shut down, the LocalCluster was left with no workers and the flow waited
forever in `run_partitions` (twice at 1M orders, dask x2). A longer timeout, for the benchmark only."""
HUNG_AFTER_S = 600
"""A stage whose processes use almost no CPU for this long is stopped and recorded as hung."""
STAGES: list[tuple[str, list[str]]] = [
    ("ingest", ["ingest", "--source", "{source}"]),
    ("features", ["features", "build"]),
    ("train", ["train"]),
    ("limits", ["limits"]),
]
RUNS: list[tuple[str, str, int]] = [  # (dataset, engine, workers): the order `main` runs them in
    ("orders_1m", "local", 0),
    ("orders_1m", "dask", 2),
    ("orders_10m", "local", 0),
    ("orders_10m", "dask", 1),
    ("orders_10m", "dask", 2),
    ("orders_100m", "dask", 2),
]


@dataclass
class StageResult:
    stage: str
    ok: bool
    wall_s: float
    cpu_s: float
    driver_peak_mb: float
    worker_peak_mb: list[float]
    tree_peak_mb: float
    workers_seen: int
    load_mean: float
    load_max: float
    started_utc: str
    note: str = ""
    driver_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0


@dataclass
class RunResult:
    dataset: str
    engine: str
    workers: int
    orders: int
    merchants: int
    machine: str
    stages: list[StageResult] = field(default_factory=list)
    finished: bool = False
    stopped: str = ""
    code: str = ""
    """The commit measured (`git describe --always --dirty` of the checkout the commands ran from)."""


def label(engine: str, workers: int) -> str:
    return "local" if engine == "local" else f"dask x{workers}"


def result_path(dataset: str, engine: str, workers: int) -> Path:
    return RESULTS / f"{dataset}_{engine}{workers or ''}.json"


class TreeSampler:
    """Peak RSS of a process and of each of its descendants, and the load average, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.history: list[tuple[float, float]] = []
        self.roles: dict[int, str] = {}
        self.tree_peak = 0.0
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0.0
        for proc in procs:
            try:
                rss = proc.memory_info().rss / 2**20
                times = proc.cpu_times()
                self.cpu[proc.pid] = times.user + times.system
                if proc.pid not in self.roles:
                    self.roles[proc.pid] = self._role(proc)
            except psutil.Error:
                continue
            total += rss
            self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0.0), rss)
        self.tree_peak = max(self.tree_peak, total)
        self.loads.append(os.getloadavg()[0])

    def _role(self, proc: psutil.Process) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        # LocalCluster(processes=True): each Nanny (in the driver) spawns its worker with multiprocessing.
        return "worker" if "spawn_main" in " ".join(proc.cmdline()) else "other"

    def idle_for(self, seconds: float) -> bool:
        """True when the whole tree used less than 2 CPU seconds over the last `seconds` (a hung command)."""
        now = time.monotonic()
        self.history.append((now, sum(self.cpu.values())))
        past = [cpu for t, cpu in self.history if t <= now - seconds]
        return bool(past) and self.history[-1][1] - past[-1] < 2.0

    def role_cpu(self, role: str) -> float:
        """CPU seconds of the processes of a role at their last sample (a process's last 0.5 s can be missed)."""
        return sum(self.cpu[pid] for pid, r in self.roles.items() if r == role and pid in self.cpu)

    def role_peaks(self, role: str) -> list[float]:
        return sorted((self.peaks[pid] for pid, r in self.roles.items() if r == role), reverse=True)


def _wait(proc: subprocess.Popen, seconds: float) -> int | None:
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first (the command stops its cluster), then SIGTERM (a flow waiting on lost futures ignores
    SIGINT), then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc.send_signal(sig)
        if _wait(proc, 60) is not None:
            return
    proc.kill()
    proc.wait()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage: str, args: list[str], env: dict[str, str], log_file: Path) -> StageResult:
    cpu_before = children_cpu()
    started = time.strftime("%H:%M UTC", time.gmtime())
    start = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        hung = False
        with TreeSampler(proc.pid) as sampler:
            try:
                while (rc := _wait(proc, 30)) is None:
                    if sampler.idle_for(HUNG_AFTER_S):
                        hung = True
                        _stop(proc)
                        rc = proc.returncode
                        break
            except KeyboardInterrupt:  # stopped by hand: let the command stop its cluster, then go
                _stop(proc)
                raise
    wall = time.perf_counter() - start
    workers = sampler.role_peaks("worker")
    tail = log_file.read_text(errors="replace").strip().splitlines()[-12:]
    return StageResult(
        stage=stage, ok=rc == 0, wall_s=wall, cpu_s=children_cpu() - cpu_before,
        driver_peak_mb=max(sampler.role_peaks("driver"), default=0.0), worker_peak_mb=workers,
        tree_peak_mb=sampler.tree_peak, workers_seen=len(workers),
        load_mean=statistics.fmean(sampler.loads) if sampler.loads else os.getloadavg()[0],
        load_max=max(sampler.loads, default=0.0), started_utc=started,
        note=(f"hung: its processes used < 2 CPU s in {HUNG_AFTER_S // 60} min, stopped; " if hung else "")
        + ("" if rc == 0 else f"exit {rc}: " + " | ".join(tail)),
        driver_cpu_s=sampler.role_cpu("driver"), worker_cpu_s=sampler.role_cpu("worker"),
    )


def count_rows(folder: Path) -> int:
    import pyarrow.dataset as ds

    return ds.dataset(folder, format="parquet").count_rows()


def run(dataset: str, engine: str, workers: int, keep: bool = False, resume: bool = False,
        stages: tuple[str, ...] | None = None, raw: Path | None = None) -> RunResult:
    """Every stage (or those of `stages`) on one dataset and engine in a new workspace; the JSON is rewritten
    after each stage.

    `resume`: continue a run kept with `keep` (its workspace and JSON), from the first stage not yet done.
    `raw`: read that raw store (another run's ingest: the snapshot is the same on every engine) instead of
    ingesting; the run's JSON keeps the ingest stage an earlier run of this engine measured, noted as such."""
    from benchmarks.common import machine

    source = DATA / dataset
    home = DATA / f"ws_scale_{dataset}_{engine}{workers or ''}"
    out = result_path(dataset, engine, workers)
    env = {**os.environ, "SCFRISK_HOME": str(home), "SCFRISK_CONFIG": str(ROOT / "scfrisk.toml"),
           "SCFRISK_COMPUTE__ENGINE": engine, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    if engine == "dask":
        env |= {"SCFRISK_COMPUTE__N_WORKERS": str(workers), "SCFRISK_COMPUTE__MEMORY_LIMIT": MEMORY_LIMIT,
                "SCFRISK_COMPUTE__THREADS_PER_WORKER": "1", **DASK_WORKAROUND,
                "SCFRISK_COMPUTE__TRAIN_IN_MEMORY_ROWS": "1"}  # measure the data-parallel fit, not a local one
    if raw is not None:
        env["SCFRISK_PATHS__RAW_STORE"] = str(raw)
    earlier = load_results().get((dataset, engine, workers))
    previous = earlier if resume and home.is_dir() else None
    if previous is not None:
        result = previous
        result.stages = [s for s in result.stages if s.ok]
        result.stopped = ""
    else:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        code = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
        result = RunResult(dataset, engine, workers, count_rows(source / "orders"), count_rows(source / "merchants"),
                           machine(), code=code)
        if raw is not None:
            result.stages = [replace(s, note=f"{s.note}from an earlier run ({earlier.code}); this run read {raw}")
                             for s in (earlier.stages if earlier else []) if s.stage == "ingest" and s.ok]
    done = {s.stage for s in result.stages} | ({"ingest"} if raw is not None else set())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(result), indent=1))
    cli = [sys.executable, "-m", "pipelines.cli"]
    subprocess.run([*cli, "server", "start"], cwd=ROOT, env=env, capture_output=True, check=False)
    stage = ""
    try:
        for stage, args in STAGES:
            if stage in done or (stages is not None and stage not in stages):
                continue
            args = [a.format(source=source) for a in args]
            print(f"[{time.strftime('%H:%M:%S')}] {dataset} {label(engine, workers)}: {stage} ...", flush=True)
            measured = run_stage(stage, args, env, log_path(dataset, engine, workers, stage))
            result.stages.append(measured)
            out.write_text(json.dumps(asdict(result), indent=1))
            print(f"  {stage}: ok={measured.ok} wall {measured.wall_s:.0f} s, CPU {measured.cpu_s:.0f} s, "
                  f"workers {measured.worker_peak_mb}, driver {measured.driver_peak_mb:.0f} MB, "
                  f"load {measured.load_mean:.1f}", flush=True)
            if not measured.ok:
                result.stopped = f"{stage} failed: {measured.note}"
                break
        else:
            result.finished = stages is None
    except KeyboardInterrupt:
        result.stopped = f"interrupted during {stage}"
    finally:
        out.write_text(json.dumps(asdict(result), indent=1))
        subprocess.run([*cli, "server", "stop"], cwd=ROOT, env=env, capture_output=True, check=False)
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    return result


def load_results() -> dict[tuple[str, str, int], RunResult]:
    found = {}
    for path in sorted(RESULTS.glob("*.json")):
        raw = json.loads(path.read_text())
        stages = [StageResult(**s) for s in raw.pop("stages")]
        run_result = RunResult(**raw, stages=stages)
        found[(run_result.dataset, run_result.engine, run_result.workers)] = run_result
    return found


def _stage(run_result: RunResult | None, stage: str) -> StageResult | None:
    if run_result is None:
        return None
    return next((s for s in run_result.stages if s.stage == stage and s.ok), None)


def _cell(text: str, width: int = 160) -> str:
    """A note fit for a Markdown table cell: no pipes or newlines, shortened."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _mb(values: list[float]) -> str:
    return " / ".join(f"{v:,.0f}" for v in values) if values else "-"


def stage_table(run_result: RunResult) -> str:
    if not run_result.stages:
        return "No stage finished yet."
    rows = ["| stage | wall s | CPU s | of which driver / workers | load (mean) | driver peak MB | worker peaks MB "
            "| tree peak MB | started |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in run_result.stages:
        status = "" if s.ok else " **(failed)**"
        split = f"{s.driver_cpu_s:,.0f} / {s.worker_cpu_s:,.0f}" if s.driver_cpu_s or s.worker_cpu_s else "n/a"
        rows.append(f"| {s.stage}{status} | {s.wall_s:,.0f} | {s.cpu_s:,.0f} | {split} | {s.load_mean:.1f} | {s.driver_peak_mb:,.0f} | {_mb(s.worker_peak_mb)} | "
                    f"{s.tree_peak_mb:,.0f} | {s.started_utc} |")
    done = [s for s in run_result.stages if s.ok]
    rows.append(f"| **total (stages done)** | {sum(s.wall_s for s in done):,.0f} | {sum(s.cpu_s for s in done):,.0f} "
                f"| {sum(s.driver_cpu_s for s in done):,.0f} / {sum(s.worker_cpu_s for s in done):,.0f} "
                f"| | {max((s.driver_peak_mb for s in done), default=0):,.0f} | "
                f"{max((max(s.worker_peak_mb, default=0) for s in done), default=0):,.0f} | "
                f"{max((s.tree_peak_mb for s in done), default=0):,.0f} | |")
    failures = [f"* {s.stage} failed: {_cell(s.note, 400)}" if not s.ok else f"* {s.stage}: {_cell(s.note, 400)}"
                for s in run_result.stages if not s.ok or s.note]
    return "\n".join(rows) + ("\n\n" + "\n".join(failures) if failures else "")


def engines_table(results: dict[tuple[str, str, int], RunResult], dataset: str) -> str:
    local = results.get((dataset, "local", 0))
    one, two = results.get((dataset, "dask", 1)), results.get((dataset, "dask", 2))
    rows = ["| stage | local CPU s | dask x1 CPU s | dask x2 CPU s | dask x1 / local CPU (overhead) | x2 / local CPU | "
            "local wall s | dask x1 wall s | dask x2 wall s | speed-up x2 vs x1 (wall) | x2 vs local (wall) | "
            "loads (local / x1 / x2) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for stage, _ in STAGES:
        a, b, c = _stage(local, stage), _stage(one, stage), _stage(two, stage)

        def f(s: StageResult | None, attr: str) -> str:
            return f"{getattr(s, attr):,.0f}" if s else "-"

        def ratio(x: StageResult | None, y: StageResult | None, attr: str) -> str:
            return f"{getattr(x, attr) / getattr(y, attr):.2f}" if x and y and getattr(y, attr) else "-"

        loads = " / ".join(f"{s.load_mean:.1f}" if s else "-" for s in (a, b, c))
        rows.append(f"| {stage} | {f(a, 'cpu_s')} | {f(b, 'cpu_s')} | {f(c, 'cpu_s')} | {ratio(b, a, 'cpu_s')} | {ratio(c, a, 'cpu_s')} | "
                    f"{f(a, 'wall_s')} | {f(b, 'wall_s')} | {f(c, 'wall_s')} | {ratio(b, c, 'wall_s')} | "
                    f"{ratio(a, c, 'wall_s')} | {loads} |")
    return "\n".join(rows)


def growth_table(results: dict[tuple[str, str, int], RunResult]) -> tuple[str, list[str]]:
    """CPU seconds per million orders by stage and size on dask x2 (the 100M configuration)."""
    sizes = ["orders_1m", "orders_10m", "orders_100m"]
    runs = {d: results.get((d, "dask", 2)) for d in sizes}
    head = " | ".join(f"{d.removeprefix('orders_').upper()} ({r.orders / 1e6:.1f}M orders)" if r else d
                      for d, r in runs.items())
    rows = [f"| stage | {head} | 10M / 1M | 100M / 10M |", "|---|---:|---:|---:|---:|---:|"]
    verdicts = []
    for stage, _ in STAGES:
        per = {}
        for d, r in runs.items():
            s = _stage(r, stage)
            if r and s:
                per[d] = s.cpu_s / (r.orders / 1e6)
        cells = " | ".join(f"{per[d]:.1f}" if d in per else "-" for d in sizes)
        r1 = per["orders_10m"] / per["orders_1m"] if {"orders_1m", "orders_10m"} <= per.keys() else None
        r2 = per["orders_100m"] / per["orders_10m"] if {"orders_10m", "orders_100m"} <= per.keys() else None
        rows.append(f"| {stage} | {cells} | {f'{r1:.2f}' if r1 else '-'} | {f'{r2:.2f}' if r2 else '-'} |")
        last = r2 if r2 is not None else r1
        if last is not None:
            kind = "linear or better" if last <= 1.15 else "worse than linear"
            span = "10M -> 100M" if r2 is not None else "1M -> 10M (100M not measured)"
            verdicts.append(f"{stage}: {kind} ({span}: {last:.2f}x the CPU per million orders)")
    return "\n".join(rows), verdicts


def in_progress(run_result: RunResult) -> str:
    """How far the stage still running has got, from its log: partition tasks done, the last line."""
    done = {s.stage for s in run_result.stages}
    stage = next((name for name, _ in STAGES if name not in done), None)
    path = log_path(run_result.dataset, run_result.engine, run_result.workers, stage) if stage else None
    if path is None or not path.exists():
        return "No stage running."
    lines = path.read_text(errors="replace").splitlines()
    tasks = sum("Finished in state Completed()" in line for line in lines)
    started = lines[0][:8] if lines else "?"
    cluster = any("Creating a new Dask cluster" in line for line in lines)
    return (f"Still running when written ({time.strftime('%H:%M UTC', time.gmtime())}, load "
            f"{os.getloadavg()[0]:.1f}): `{stage}` since {started} UTC; "
            f"{'its Dask cluster is up, ' if cluster else 'its Dask cluster not up yet, '}"
            f"{tasks} partition task(s) completed so far.")


def report() -> str:
    results = load_results()
    parts = [
        "`python -m benchmarks.bench_scale` (one run: `python -m benchmarks.bench_scale run <dataset> <local|dask> "
        "<workers>`; `... report` rewrites this section from `bench_data/scale_results/`). Each stage is its own "
        "`scfrisk` command (`ingest --source`, `features build`, `train`, `limits`) in a new workspace; dask runs "
        f"start a LocalCluster of N worker processes, 1 thread each, `memory_limit` {MEMORY_LIMIT}. CPU s = the "
        "whole process tree (command + Dask workers); worker peaks = RSS of each worker process sampled every "
        "0.5 s (psutil); tree peak = the sum over all processes of the stage at one sample. Datasets: "
        "`scfrisk simulate --merchants N --months 24 --seed 42`. The machine is shared (2 cores, 24 GB, several "
        "other jobs): the load column is the mean 1-minute load average during the stage; compare CPU seconds and "
        "ratios, not wall times across runs.",
    ]
    codes = sorted({r.code or "not recorded" for r in results.values()})
    parts.append(f"Code measured: {', '.join(codes)}.")
    big = results.get(("orders_100m", "dask", 2))
    parts.append("### 100M orders, dask engine, 2 workers x 4 GiB")
    if big is None:
        parts.append("Not run yet.")
    else:
        state = "all four stages finished" if big.finished else (
            f"**partial: {_cell(big.stopped, 400)}**" if big.stopped else
            f"**partial: still running when these figures were written ({len(big.stages)} of {len(STAGES)} "
            "stages measured)**")
        parts.append(f"{big.orders:,} orders, {big.merchants:,} merchants: {state}.\n\n{stage_table(big)}")
        if not big.finished and not big.stopped:
            parts.append(in_progress(big))
        done = [s for s in big.stages if s.ok]
        if done:
            peak = max(max(s.worker_peak_mb, default=0) for s in done)
            parts.append(f"Peak RSS of any worker over the stages measured: {peak:,.0f} MB (goal < 4,096 MB: "
                         f"{'met' if peak < 4096 else 'not met'}). The driver (the `scfrisk` command) is listed "
                         "apart: on a real cluster it is the flow run's process, not a worker.")
    ten = [k for k in results if k[0] == "orders_10m"]
    parts.append("### 10M orders: local engine against dask with 1 and 2 workers")
    if ten:
        parts.append(engines_table(results, "orders_10m"))
        for key in sorted(ten):
            r = results[key]
            parts.append(f"{label(r.engine, r.workers)}, {r.orders:,} orders"
                         f"{'' if r.finished else ' (partial: ' + _cell(r.stopped or 'unfinished', 300) + ')'}:\n\n"
                         f"{stage_table(r)}")
        parts.append("Overhead of the engine = dask x1 CPU / local CPU (same work, one worker: the scheduler, "
                     "Prefect task runs, pickling and the worker processes). Speed-up = dask x1 wall / dask x2 "
                     "wall: on a machine with 2 cores shared by other jobs, it is bounded by the cores the "
                     "load leaves.")
    else:
        parts.append("Not run yet.")
    parts.append("### Growth: CPU seconds per million orders (dask x2)")
    table, verdicts = growth_table(results)
    parts.append(table)
    if verdicts:
        parts.append("\n".join(f"* {v}" for v in verdicts))
    return "\n\n".join(parts)


def log_path(dataset: str, engine: str, workers: int, stage: str) -> Path:
    return DATA / f"ws_scale_{dataset}_{engine}{workers or ''}.{stage}.log"


def training_rows(run_result: RunResult) -> tuple[str, int] | None:
    """Where the boosters were fitted and on how many rows, from the train stage's log."""
    path = log_path(run_result.dataset, run_result.engine, run_result.workers, "train")
    found = re.search(r"training on (\S+): ([\d,]+) rows", path.read_text(errors="replace")) if path.exists() else None
    return (found.group(1), int(found.group(2).replace(",", ""))) if found else None


def _fit(points: list[tuple[float, float]], x: float) -> float:
    """A straight line through the measured (size, value) points, read at x (flat with one point)."""
    if len(points) < 2:
        return points[0][1]
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) / (x1 - x0) * (x - x1) if x1 != x0 else y1


def _line(points: list[tuple[float, float]], x: float) -> float:
    """The line through the last two (size, CPU s) points read at x, or proportional to one point."""
    if len(points) < 2:
        return points[0][1] * x / points[0][0]
    return max(_fit(points, x), 0.0)


def projection(results: dict[tuple[str, str, int], RunResult]) -> str:
    """CPU, wall hours and memory at TARGET_ORDERS / TARGET_MERCHANTS, from the largest dask x2 runs."""
    runs = sorted((r for (d, e, w), r in results.items() if e == "dask" and w == 2), key=lambda r: r.orders)
    if not runs:
        return "Nothing measured yet."
    head = " | ".join(f"{w} workers" for w in WORKER_COUNTS)
    rows = [f"| stage | basis (largest run with the stage) | scaled by | serial CPU h (flow run) | worker CPU h | "
            f"wall h at {head} | worker peak MB (kept) | flow-run peak MB (line through the runs) |",
            "|---|---|---|---:|---:|" + "---:|" * len(WORKER_COUNTS) + "---:|---:|"]
    notes = []
    for stage, _ in STAGES:
        measured = [(r, _stage(r, stage)) for r in runs]
        measured = [(r, s) for r, s in measured if s is not None and (s.worker_cpu_s or s.driver_cpu_s)]
        if not measured:
            rows.append(f"| {stage} | not measured | | | |" + " |" * len(WORKER_COUNTS) + " | |")
            continue
        basis, s = measured[-1]
        by_orders = stage in BY_ORDERS
        size = (lambda r: r.orders) if by_orders else (lambda r: r.merchants)
        target = TARGET_ORDERS if by_orders else TARGET_MERCHANTS
        factor = target / size(basis)
        # With two sizes, the line through them (its slope is the cost per order or merchant, without the fixed
        # start-up cost of the command); with one, proportional (start-up included: an overestimate).
        serial = _line([(size(r), st.cpu_s - st.worker_cpu_s) for r, st in measured], target) / 3600
        parallel = _line([(size(r), st.worker_cpu_s) for r, st in measured], target) / 3600
        walls = " | ".join(f"{serial + parallel / w:,.1f}" for w in WORKER_COUNTS)
        driver = _fit([(size(r), st.driver_peak_mb) for r, st in measured], target)
        worker = max(s.worker_peak_mb, default=0.0)
        rows.append(f"| {stage} | {basis.dataset} ({basis.orders / 1e6:,.0f}M orders, {basis.merchants:,} merchants) | "
                    f"{'orders' if by_orders else 'merchants'} x{factor:,.1f} | {serial:,.2f} | {parallel:,.2f} | "
                    f"{walls} | {worker:,.0f} | {driver:,.0f} |")
    biggest = runs[-1]
    with_features = [r for r in runs if _stage(r, "features")]
    per_bucket = with_features[-1].merchants / 8 if with_features else 0
    buckets = math.ceil(TARGET_MERCHANTS / per_bucket) if per_bucket else 0
    if not buckets:
        notes.append("Merchant buckets: no features stage measured on the dask engine yet, so no bucket size to keep.")
    else:
        notes.append(f"Merchant buckets: the runs used 8 buckets, {per_bucket:,.0f} merchants per bucket at "
                     f"{with_features[-1].dataset}. To keep a feature/score/limit partition that size at "
                     f"{TARGET_MERCHANTS:,} merchants, a new raw store needs `merchant_buckets` >= {buckets:,} (e.g. "
                     f"{2 ** math.ceil(math.log2(buckets)):,}).")
    from core.sources import PIECE_ROWS
    from pipelines.ingest import UNIT_ROWS

    units = TARGET_ORDERS * 2.6 / UNIT_ROWS
    notes.append(f"Ingest units stay ~{UNIT_ROWS:,} rows whatever the batch: at about 2.6 rows of all tables per "
                 f"order, 1B orders make ~{units:,.0f} units, and the split one task per source piece of "
                 f"~{PIECE_ROWS:,} rows (~{TARGET_ORDERS * 2.6 / PIECE_ROWS:,.0f} pieces): enough tasks for every "
                 "worker count above.")
    trained = training_rows(biggest) if _stage(biggest, "train") else None
    if trained:
        engine, rows_measured = trained
        rows_target = rows_measured * TARGET_MERCHANTS / biggest.merchants
        notes.append(f"Training: {rows_measured:,} training rows at {biggest.dataset} (fitted on `{engine}`); "
                     f"~{rows_target / 1e6:,.1f}M at {TARGET_MERCHANTS:,} merchants (same loans per merchant), above "
                     "`train_in_memory_rows` (2M), so data-parallel on the workers: at the settings' estimate of "
                     f"~1.3 GB per 2M rows, ~{rows_target / 2e6 * 1.3:,.0f} GB spread over the workers (e.g. "
                     f"{rows_target / 2e6 * 1.3 / 64:,.1f} GB each on 64), on top of their partition peak, plus the "
                     "binning rows (at most 200,000) and the validation cohort, which every worker holds.")
    return "\n".join(rows) + "\n\n" + "\n\n".join(f"* {n}" for n in notes)


def write_scaling(results: dict[tuple[str, str, int], RunResult]) -> None:
    """Rewrite the generated parts of docs/scaling.md (between its bench_scale markers) from the results."""
    text = SCALING_DOC.read_text()
    for name, body in (("measured", measured_summary(results)), ("projected", projection(results))):
        pattern = re.compile(rf"(<!-- bench_scale:{name} -->\n).*?(<!-- /bench_scale:{name} -->)", re.S)
        text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
    SCALING_DOC.write_text(text)


def measured_summary(results: dict[tuple[str, str, int], RunResult]) -> str:
    """Per stage and run: CPU seconds per million orders and per 1,000 merchants, worker and flow-run peaks."""
    rows = ["| run | stage | CPU s per 1M orders | CPU s per 1k merchants | worker CPU share | worker peak MB | "
            "flow-run peak MB | load |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(results, key=lambda k: (results[k].orders, k[1], k[2])):
        r = results[key]
        for s in r.stages:
            if not s.ok:
                rows.append(f"| {r.dataset}, {label(r.engine, r.workers)} | {s.stage} | failed: {_cell(s.note)} "
                            "| | | | | |")
                continue
            share = f"{s.worker_cpu_s / s.cpu_s:.0%}" if s.cpu_s and (s.worker_cpu_s or s.driver_cpu_s) else "n/a"
            rows.append(f"| {r.dataset}, {label(r.engine, r.workers)} | {s.stage} | {s.cpu_s / (r.orders / 1e6):,.1f} "
                        f"| {s.cpu_s / (r.merchants / 1e3):,.2f} | {share} | {max(s.worker_peak_mb, default=0):,.0f} "
                        f"| {s.driver_peak_mb:,.0f} | {s.load_mean:.1f} |")
        if not r.finished:
            rows.append(f"| {r.dataset}, {label(r.engine, r.workers)} | (stopped or still running: "
                        f"{_cell(r.stopped or 'unfinished')}) | | | | | | |")
    return "\n".join(rows)


def engines(dataset: str) -> None:
    """The local engine's ingest, then features, train and limits on the local engine and on dask x1 and x2 at
    once (each its own process, so that each counts its own CPU), the dask runs reading the local run's raw
    store (the same snapshot), then the report. Side by side because one after the other does not fit in a
    morning on this shared machine; the load column says what that costs in wall time."""
    bench = [sys.executable, "-m", "benchmarks.bench_scale", "run", dataset]
    subprocess.run([*bench, "local", "0", "--keep", "--stages", "ingest"], cwd=ROOT, check=True)
    raw = str(DATA / f"ws_scale_{dataset}_local" / "raw")
    runs = [subprocess.Popen([*bench, "local", "0", "--resume"], cwd=ROOT)]
    runs += [subprocess.Popen([*bench, "dask", str(n), "--raw", raw], cwd=ROOT) for n in (2, 1)]
    for proc in runs:
        proc.wait()
    shutil.rmtree(DATA / f"ws_scale_{dataset}_local", ignore_errors=True)
    text = report()
    write_section(TITLE, text)
    write_scaling(load_results())


def main() -> None:
    for dataset, engine, workers in RUNS:
        run(dataset, engine, workers)
    body = report()
    print(body)
    write_section(TITLE, body)
    write_scaling(load_results())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        def option(name: str) -> str | None:
            return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None

        only, raw = option("--stages"), option("--raw")
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0,
            keep="--keep" in sys.argv or "--resume" in sys.argv, resume="--resume" in sys.argv,
            stages=tuple(only.split(",")) if only else None, raw=Path(raw) if raw else None)
    elif len(sys.argv) > 1 and sys.argv[1] == "engines":
        engines(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "report":
        text = report()
        print(text)
        write_section(TITLE, text)
        write_scaling(load_results())
    else:
        main()
