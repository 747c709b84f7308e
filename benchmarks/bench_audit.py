"""What a durable audit line costs: `AuditLog` on this machine's disk, then the service under wrk.

In process: one line appended (`write`, page cache only) against one line appended and synced
(`write` + `commit`, an `fdatasync`), one at a time; then many requests at once, whose syncs are shared
(group commit). Service: `scfrisk serve` on a published bundle, `wrk` closed loop on an online-store
decision (one audit line per request). Set `SCFRISK_BENCH_BEFORE` to a checkout of the code before
durable audit lines (067caac: lines appended, never synced) to measure it in the same run.
Run with `python -m benchmarks bench_audit`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_service import KEY, _free_port, _stop, wrk
from benchmarks.common import write_section
from core.settings import Settings
from pipelines.publish import publish
from serving.audit import AuditLog
from testkit.service import make_parts, online_snapshot, train_model

log = logging.getLogger("bench_audit")

REPO = Path(__file__).resolve().parents[1]
LINE = {"request_id": "0" * 32, "merchant_id": "M0000001", "features": None, "pd": 0.0123, "reasons": ["x"] * 4,
        "pad": "x" * 600}
"""About the size of a real audit line of an online-store decision (~900 bytes)."""
APPEND_LINES = 20_000
SYNCED_LINES = 500
CONCURRENT = (8, 64)
CONCURRENT_SECONDS = 5.0
WRK_SECONDS = 15
BEFORE = "SCFRISK_BENCH_BEFORE"


def per_line_us(folder: Path, synced: bool) -> dict[str, float]:
    audit = AuditLog(folder / f"lines-{synced}.jsonl")
    times = []
    for _ in range(SYNCED_LINES if synced else APPEND_LINES):
        start = time.perf_counter()
        seq = audit.write(LINE)
        if synced:
            asyncio.run(audit.commit(seq))
        times.append(time.perf_counter() - start)
    audit.close()
    return {"p50": float(np.percentile(times, 50)) * 1e6, "p99": float(np.percentile(times, 99)) * 1e6}


def concurrent_lines_per_second(folder: Path, tasks: int) -> float:
    """`tasks` writers, each appending then awaiting its commit, as concurrent requests do."""
    audit = AuditLog(folder / f"concurrent-{tasks}.jsonl")
    done = 0

    async def writer(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await audit.commit(audit.write(LINE))
            done += 1

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(writer(start + CONCURRENT_SECONDS) for _ in range(tasks)))
        return time.perf_counter() - start

    seconds = asyncio.run(run())
    audit.close()
    return done / seconds


def serve_and_load(checkout: Path, config: Path, body: str, work: Path) -> dict[str, float]:
    """`scfrisk serve` of the code in `checkout`, then wrk on one online-store decision."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port)], cwd=checkout,
                            env={**os.environ, "SCFRISK_CONFIG": str(config), "PYTHONPATH": str(checkout)},
                            stdout=(work / f"{port}.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the service of {checkout} did not start:\n{(work / f'{port}.log').read_text()}")
            time.sleep(0.2)
        wrk(url, "/v1/score", body, work, seconds=2)  # warm-up
        return wrk(url, "/v1/score", body, work, seconds=WRK_SECONDS)
    finally:
        _stop(proc)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:  # the disk the workspace is on
        work = Path(tmp)
        append, synced = per_line_us(work, synced=False), per_line_us(work, synced=True)
        log.info("per line: append %s, append + fdatasync %s", append, synced)
        concurrent = {tasks: concurrent_lines_per_second(work, tasks) for tasks in CONCURRENT}
        log.info("concurrent lines/s: %s", concurrent)
        settings = Settings(home=work / "home")
        snapshot = online_snapshot(1000)
        publish(make_parts(work, train_model(seed=7), snapshot), settings)
        config = work / "scfrisk.toml"
        config.write_text(f'home = "{work / "home"}"\npolicy_file = "{REPO / "policy.toml"}"\n'
                          f'[service]\napi_keys = ["{KEY}"]\n')
        body = json.dumps({"merchant_id": snapshot["merchant_id"].iloc[0], "product": "microloan",
                           "requested_amount": 500})
        checkouts = {"durable lines (this code)": REPO}
        if os.environ.get(BEFORE):
            checkouts = {"lines never synced (before, 067caac)": Path(os.environ[BEFORE]), **checkouts}
        service = {}
        for name, checkout in checkouts.items():
            service[name] = serve_and_load(checkout, config, body, work)
            log.info("%s: %s", name, service[name])
        load = os.getloadavg()[0]
    write_section("Audit log durability", _report(append, synced, concurrent, service, load))


def _report(append: dict, synced: dict, concurrent: dict, service: dict, load: float) -> str:
    lines = [
        "`python -m benchmarks bench_audit`: `serving.audit.AuditLog` on the workspace's disk (ext4 on a "
        f"virtual disk), lines of ~900 bytes; load average {load:.1f} at the end.",
        "",
        "| one line at a time | p50 | p99 |",
        "|---|---:|---:|",
        f"| appended (`write`, page cache only) | {append['p50']:,.1f} us | {append['p99']:,.1f} us |",
        f"| appended and synced (`write` + `commit`: `fdatasync`) | {synced['p50'] / 1e3:,.2f} ms | "
        f"{synced['p99'] / 1e3:,.2f} ms |",
        "",
        "| writers at once, each waiting for its line to be synced | lines per second |",
        "|---|---:|",
        *(f"| {tasks} | {rate:,.0f} |" for tasks, rate in concurrent.items()),
        "",
        f"Service: `wrk -t1 -c8 -d{WRK_SECONDS}s` on `POST /v1/score` (online-store merchant, product and amount: "
        "one audit line per answer), `scfrisk serve` with one worker.",
        "",
        "| code | req/s | p50 | p99 |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {r['rate']:,.0f} | {r['p50']:.1f} ms | {r['p99']:.1f} ms |" for name, r in service.items()),
        "",
        "An answer waits for the `fdatasync` that covers its line; requests arriving while one runs share the "
        "next (group commit), so the cost per request falls as load rises: one sync per line, one at a time, "
        "would cap the service near 1 / p50 of a synced line "
        f"(about {1e6 / synced['p50']:,.0f} lines/s here).",
    ]
    return "\n".join(lines)
