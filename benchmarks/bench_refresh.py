"""One simulated day of `scfrisk refresh`, end to end, against the full rebuild of the online features.

For each platform (the 3,300-merchant sample; `bench_data/orders_10m` when it exists, under
`$SCFRISK_BENCH_DATA` if set): cut at its last day D (`testkit.daily.split_day`: base = what was known before
D, the day's pull = D's rows and the older rows whose state changed during D), ingest the base into a new
workspace, register a champion (the service tests' small model, `testkit.service`), build the daily partials
once as of D (the one full build), then time the refresh of day D: pull (validate + raw store), incremental
features as of D + 1, re-score and limits, the early warning on every live loan, the day's snapshot written,
publish. The full rebuild of the same online vector (`OfflineStore.materialize`, the monthly path) runs in
the same process right after, and the two vectors are compared feature by feature. Then the next day with
nothing pulled (the windows roll, masks flip): the incremental features against the full rebuild again.
Goals: the day end to end < 30 s on the sample, < 120 s on 10M orders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pandas as pd

from benchmarks.bench_simulate import BENCH_DATA
from benchmarks.common import self_peak_mb, write_section
from core.settings import Settings
from core.sql import fetch_one

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCFRISK_BENCH_DATA", BENCH_DATA))
"""The simulator's batches (`bench_simulate`): `$SCFRISK_BENCH_DATA`, default `bench_data/` in the repository."""
RATE = 50.0
"""Requests a second to the scoring service during a refresh (`service_during_refresh`)."""
STEADY_SECONDS = 8.0
"""From the load generator's start (which takes 2 to 3 s) to the refresh's: the service undisturbed, the
baseline of the same run."""
SWITCH_TIMEOUT_SECONDS = 300.0
"""A service that never switches (a bundle it refuses) fails the benchmark instead of hanging it."""
PLATFORMS = {"data_samples/platform": (REPO / "data_samples" / "platform", 30.0),
             "bench_data/orders_10m": (DATA / "orders_10m", 120.0),
             "bench_data/orders_10m_dense": (DATA / "orders_10m_dense", 120.0)}
"""Name -> (batch, goal s). The dense batch: as many orders from a tenth of the merchants, ten times larger
sellers (`bench_simulate`), where a merchant's day holds several orders for the daily partials to add up."""


def _last_day(source: Path) -> pd.Timestamp:
    (last,) = fetch_one(duckdb.connect(), f"SELECT max(ordered_at) FROM read_parquet('{source}/orders/*.parquet')")
    return pd.Timestamp(last).normalize()


def _max_gap(a: pd.DataFrame, b: pd.DataFrame) -> float:
    from features.definitions import FEATURES

    gaps = [0.0]
    for f in FEATURES:
        if f.kind == "categorical":
            gaps.append(0.0 if a[f.name].fillna("").tolist() == b[f.name].fillna("").tolist() else float("inf"))
            continue
        x, y = a[f.name].to_numpy(float), b[f.name].to_numpy(float)
        if (np.isnan(x) != np.isnan(y)).any():
            return float("inf")
        known = ~np.isnan(y)
        gaps.append(float((np.abs(x[known] - y[known]) / np.maximum(1.0, np.abs(y[known]))).max(initial=0.0)))
    return max(gaps)


def service_during_refresh(settings: Settings, source: Path, as_of: pd.Timestamp, merchant: str,
                           seconds: float) -> dict[str, dict[str, float]]:
    """The scoring service's latency (open loop, `RATE` requests a second for one merchant) while a refresh
    runs beside it and it switches to the refresh's bundle: per window (steady before the refresh, during the
    refresh, from its publish until the service answers with the new bundle, after), p50 / p99 / max ms and
    the requests that were not answered 200."""
    import httpx

    from benchmarks.bench_service import KEY, _free_port, _start, _stop, load_process
    from pipelines.refresh import refresh

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"SCFRISK_HOME": str(settings.home), "SCFRISK_API_KEYS": KEY}
    proc = _start([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port)], env, f"{url}/readyz",
                  settings.home / "bench_serve.log")
    marks: dict[str, float] = {}

    def day() -> None:
        time.sleep(STEADY_SECONDS)
        marks["refresh"] = time.time()
        bundle = refresh(settings, source, as_of).bundle_id
        marks["published"] = time.time()
        while httpx.get(f"{url}/readyz", headers={"X-API-Key": KEY}).json().get("bundle_id") != bundle:
            if time.time() - marks["published"] > SWITCH_TIMEOUT_SECONDS:
                raise RuntimeError(f"the service did not switch to bundle {bundle} within "
                                   f"{SWITCH_TIMEOUT_SECONDS:.0f} s: {settings.home / 'bench_serve.log'}")
            time.sleep(0.05)
        marks["switched"] = time.time()

    body = json.dumps({"merchant_id": merchant, "product": "order_financing", "requested_amount": 1000})
    try:
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(day)
            series = np.array(load_process(url, "/v1/score", body, RATE, seconds, series=True)["series"])
            done.result()
    finally:
        _stop(proc)
    due, ms, ok = series[:, 0], series[:, 1], series[:, 2].astype(bool)
    edges = {"steady": (due.min(), marks["refresh"]), "refresh": (marks["refresh"], marks["published"]),
             "switch": (marks["published"], marks["switched"]), "after": (marks["switched"], np.inf)}
    out = {}
    for window, (start, end) in edges.items():
        inside = (due >= start) & (due < end)
        if inside.any():
            out[window] = {"n": int(inside.sum()), "p50": float(np.percentile(ms[inside], 50)),
                           "p99": float(np.percentile(ms[inside], 99)), "max": float(ms[inside].max()),
                           "failed": int((~ok[inside]).sum()), "seconds": min(end, due.max()) - start}
    return out


def measure(name: str, source: Path) -> dict:
    from core.raw_store import RawStore
    from features.daily import plan
    from features.daily_store import DailyStore
    from features.definitions import FEATURES
    from features.offline_store import OfflineStore
    from features.online_store import ONLINE_FILE
    from features.training_set import compute_features, normalise_entities, table_readers
    from pipelines.ingest import ingest
    from pipelines.refresh import partials_folder, refresh
    from testkit.daily import split_day
    from testkit.service import register_champion

    day = _last_day(source)
    with tempfile.TemporaryDirectory(dir=DATA if DATA.is_dir() else None) as tmp:
        work = Path(tmp)
        counts = split_day(source, day, work / "base", work / "day")
        settings = Settings(home=work / "home")
        wall = time.perf_counter()
        ingest(work / "base", settings)
        base_s = time.perf_counter() - wall
        register_champion(settings)
        wall, cpu = time.perf_counter(), time.process_time()
        first = DailyStore(partials_folder(settings), RawStore.from_settings(settings)).refresh(day)
        first_s, first_cpu = time.perf_counter() - wall, time.process_time() - cpu
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        summary = refresh(settings, work / "day")
        day_s, day_cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        offline = OfflineStore.from_settings(settings)
        # the refresh wrote it: recompute it from the raw store
        offline.fs.rm(fsspec.core.strip_protocol(str(offline.snapshot_path(summary.as_of))))
        full = offline.read(summary.as_of)
        full_s, full_cpu = time.perf_counter() - wall, time.process_time() - cpu
        incremental = offline.read_file(offline.location(*ONLINE_FILE.parts))
        # The next day with nothing pulled: only the windows roll and the masks flip (due dates pass).
        quiet_day = summary.as_of + pd.Timedelta(days=1)
        cpu = time.process_time()
        quiet = DailyStore(partials_folder(settings), RawStore.from_settings(settings)).refresh(quiet_day)
        quiet_cpu = time.process_time() - cpu
        cpu = time.process_time()
        quiet_full = offline.read(quiet_day)
        quiet_full_cpu = time.process_time() - cpu

        def computed(frame: pd.DataFrame, features: tuple = FEATURES) -> tuple[pd.DataFrame, float, float]:
            """`compute_features` of the frame's merchants at once, in the frame's row order; wall and CPU s."""
            store = RawStore.from_settings(settings).pinned()
            con = store.connect()
            wall, cpu = time.perf_counter(), time.process_time()
            out = compute_features(normalise_entities(frame[["merchant_id", "as_of"]]), table_readers(store, con),
                                   features=features, con=con)
            seconds = time.perf_counter() - wall, time.process_time() - cpu
            return out.set_index("merchant_id").loc[frame["merchant_id"]].reset_index(), *seconds

        def direct_cpu(frame: pd.DataFrame) -> float:
            """The features that do not roll (`plan().direct`) computed alone, as both paths compute them."""
            return computed(frame, plan().direct)[2]

        # The full recompute as one query over every merchant (no buckets, the raw rows in one DuckDB budget):
        # the fastest full recompute one machine has, what the incremental path must beat.
        one, one_s, one_cpu = computed(incremental)
        _, quiet_one_s, quiet_one_cpu = computed(quiet.features)

        service = service_during_refresh(settings, work / "day", quiet_day + pd.Timedelta(days=1),
                                         str(incremental["merchant_id"].iloc[0]), STEADY_SECONDS + 2 * day_s + 30)
        return {
            "service": service,
            "name": name, "day": day, "counts": counts, "merchants": summary.merchants, "base_s": base_s,
            "first_s": first_s, "first_cpu": first_cpu, "first_rows": len(first.features),
            "seconds": summary.seconds, "cpu": summary.cpu_seconds, "day_s": day_s, "day_cpu": day_cpu,
            "phases": summary.feature_cpu_seconds, "full_s": full_s,
            "full_cpu": full_cpu, "gap": _max_gap(incremental, full), "load": load,
            "load_after": os.getloadavg()[0], "features": summary.features,
            "monitor": summary.monitor.splitlines()[0],
            "quiet_cpu": quiet_cpu, "quiet_full_cpu": quiet_full_cpu, "quiet_phases": quiet.cpu_seconds,
            "quiet_gap": _max_gap(quiet.features.reset_index(drop=True), quiet_full.reset_index(drop=True)),
            "quiet": quiet.describe(), "direct": len(plan().direct),
            "direct_cpu": direct_cpu(incremental), "quiet_direct_cpu": direct_cpu(quiet.features),
            "one_s": one_s, "one_cpu": one_cpu, "one_gap": _max_gap(incremental, one),
            "quiet_one_s": quiet_one_s, "quiet_one_cpu": quiet_one_cpu,
        }


def render(results: list[dict], goals: dict[str, float]) -> str:
    lines = [
        "One simulated day through `scfrisk refresh` (`pipelines.refresh.refresh`, the flow's body): the platform "
        "cut at its last day D (`testkit.daily.split_day`: base = what was known before D; the day's pull = "
        "D's rows plus the older rows whose state changed during D), the base ingested and the daily partials "
        "and prefix sums built once as of D, then the day timed: pull, incremental features as of D + 1, "
        "re-score and limits, the early warning on every live loan (`monitor`), the day's features written "
        "(`snapshot`: the offline store's snapshot and the online file), publish. The full rebuild of the same "
        "online vector (`OfflineStore.materialize`, the monthly path, its snapshot written) runs in the same "
        "process right "
        "after; the two vectors are compared feature by feature (largest gap, relative above 1). One run each; "
        "the machine is shared, so CPU seconds (this process, all threads) are given beside wall seconds, with "
        "the 1-minute load average before / after the day. The platforms: the 3,300-merchant sample; "
        "`bench_data/orders_10m` (39,000 merchants, about 10 orders a month each over 24 months); "
        "`bench_data/orders_10m_dense` (as many orders from 3,900 merchants, ten times larger sellers: "
        "`scfrisk simulate --orders-per-month 100`, `bench_simulate`).",
        "",
        "| platform | merchants | day's pull (orders new + changed) | pull s (CPU) | features s (CPU) | score s (CPU) "
        "| monitor s (CPU) | snapshot s (CPU) | publish s (CPU) | **day end to end s (CPU)** "
        "| full rebuild of the features s (CPU) | incremental / full features: CPU, wall | largest gap | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, c = r["seconds"], r["cpu"]
        written, written_s = c["features"] + c["snapshot"], s["features"] + s["snapshot"]  # as the rebuild writes
        lines.append(
            f"| `{r['name']}` | {r['merchants']:,} | {r['counts']['orders']['day']:,} | {s['pull']:.1f} ({c['pull']:.1f}) "
            f"| {s['features']:.1f} ({c['features']:.1f}) | {s['score']:.1f} ({c['score']:.1f}) "
            f"| {s['monitor']:.1f} ({c['monitor']:.1f}) | {s['snapshot']:.1f} ({c['snapshot']:.1f}) "
            f"| {s['publish']:.1f} ({c['publish']:.1f}) "
            f"| **{r['day_s']:.1f} ({r['day_cpu']:.1f})** | {r['full_s']:.1f} ({r['full_cpu']:.1f}) "
            f"| {written / r['full_cpu']:.2f}, {written_s / r['full_s']:.2f} | {r['gap']:.1e} "
            f"| {r['load']:.1f} / {r['load_after']:.1f} |"
        )
    lines += ["", "The feature step's CPU seconds by phase (changes: the (merchant, day) pairs to recompute, from "
                  "the pull's change files and the times that passed; partials: their recomputation from the raw "
                  "store, replacing theirs in the daily database with their month sums, and its commit; prefix: "
                  "the prefix sums rolled forward; roll-up: the online vector, including the features read from "
                  "the raw store directly):"]
    lines += [f"- `{r['name']}`: " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()) for r in results]
    lines += ["", "The next day with nothing pulled (D + 2: the windows roll, the masks flip as due dates pass; "
                  "what the incremental step costs without the day's corrections), features only (not written), "
                  "against the full rebuild as of D + 2 in the same process (its snapshot written):"]
    lines += [f"- `{r['name']}`: incremental {r['quiet_cpu']:.1f} s CPU ("
              + ", ".join(f"{k} {v:.2f}" for k, v in r["quiet_phases"].items())
              + f"), full rebuild {r['quiet_full_cpu']:.1f} s CPU: **{r['quiet_cpu'] / r['quiet_full_cpu']:.2f}** of it; "
              f"largest gap {r['quiet_gap']:.1e}; {r['quiet']}." for r in results]
    lines += ["", "Where the two paths differ: the features that do not roll (distinct buyers, the latest value per "
                  "loan, the merchant profile: `features.daily.plan().direct`) are the same point-in-time SQL over "
                  "the raw store in both; measured alone in the same process, what remains of each path is the "
                  "windows (incremental: changes, partials, prefix sums and their roll-up; full: the windows "
                  "recomputed from the raw rows):"]
    for r in results:
        parts = []
        written = r["cpu"]["features"] + r["cpu"]["snapshot"]
        for label, inc, full, direct in (("the day", written, r["full_cpu"], r["direct_cpu"]),
                                          ("the next day", r["quiet_cpu"], r["quiet_full_cpu"],
                                           r["quiet_direct_cpu"])):
            parts.append(f"{label}: {r['direct']} direct features {direct:.1f} s CPU; the windows incremental "
                         f"{inc - direct:.1f} against full {full - direct:.1f}: **{(inc - direct) / (full - direct):.2f}**")
        lines.append(f"- `{r['name']}`: " + "; ".join(parts) + ".")
    lines += ["", "The stronger baseline: the same online vector as one query over every merchant "
                  "(`compute_features` unbatched: no buckets, every raw row in one DuckDB budget, which a platform "
                  "past one machine does not have; the monthly path above splits it by merchant bucket to bound "
                  "memory and spread it over workers). CPU s (wall s), and the incremental features step's "
                  "share of it (the vector computed, not written, as the one query), whole and windows only (the "
                  "direct features taken out of both):"]
    for r in results:
        parts = []
        for label, inc, inc_s, one, one_s, direct in (
                ("the day", r["cpu"]["features"], r["seconds"]["features"], r["one_cpu"], r["one_s"], r["direct_cpu"]),
                ("the next day", r["quiet_cpu"], None, r["quiet_one_cpu"], r["quiet_one_s"], r["quiet_direct_cpu"])):
            wall = f", wall {inc_s / one_s:.2f}" if inc_s is not None else ""
            parts.append(f"{label}: one query {one:.1f} ({one_s:.1f}); incremental / one query: CPU "
                         f"**{inc / one:.2f}**{wall}; windows only **{(inc - direct) / (one - direct):.2f}**")
        lines.append(f"- `{r['name']}`: " + "; ".join(parts) + f"; largest gap to the incremental vector "
                     f"{r['one_gap']:.1e}.")
    lines += ["", f"The scoring service during a refresh: `scfrisk serve` on the workspace, {RATE:.0f} requests a "
                  "second (open loop, one online-store merchant; latency from each request's due time, so a stall "
                  "is not hidden), a few seconds undisturbed (the baseline), then a refresh (the day after "
                  "D + 2, nothing pulled) in the benchmark's process beside it, which publishes a bundle the "
                  "service switches to (loads and checks it in a thread, then swaps one reference); latency ms "
                  "per window, and the requests not answered 200:", "",
              "| platform | window | s | requests | p50 | p99 | max | not 200 | p99 / steady p99 |",
              "|---|---|---|---|---|---|---|---|---|"]
    labels = {"steady": "steady, before", "refresh": "the refresh running", "switch": "publish to switch",
              "after": "after the switch"}
    for r in results:
        steady = r["service"]["steady"]["p99"]
        for window, w in r["service"].items():
            lines.append(f"| `{r['name']}` | {labels[window]} | {w['seconds']:.1f} | {w['n']:,} | {w['p50']:.1f} "
                         f"| {w['p99']:.1f} | {w['max']:.1f} | {w['failed']} | {w['p99'] / steady:.1f} |")
    lines += ["", "Set-up, not part of the day: base ingest and the first (full) build of the daily partials:"]
    lines += [f"- `{r['name']}` (D = {r['day']:%Y-%m-%d}): base ingest {r['base_s']:.0f} s wall; first build "
              f"{r['first_s']:.1f} s wall / {r['first_cpu']:.1f} s CPU; the day: {r['features']}; {r['monitor']}."
              for r in results]
    verdicts = []
    for r in results:
        goal = goals[r["name"]]
        verdicts.append(f"`{r['name']}` {r['day_s']:.1f} s wall, {r['day_cpu']:.1f} s CPU (goal < {goal:.0f} s: "
                        f"{'met' if r['day_s'] < goal else '**NOT met** as measured'})")
    exact = all(r["gap"] <= 1e-12 for r in results)
    lines += ["", f"**Goals, one day end to end:** {'; '.join(verdicts)}. Incremental features equal to the full "
                  f"rebuild within 1e-12: {'yes' if exact else '**no**'}. Peak RSS of the run: "
                  f"{self_peak_mb():,.0f} MB."]
    missing = [n for n in PLATFORMS if n not in {r["name"] for r in results}]
    if missing:
        lines.append(f"Not measured (data absent): {', '.join(missing)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One simulated day through scfrisk refresh, against a full rebuild.")
    parser.add_argument("platforms", nargs="*", metavar="PLATFORM",
                        help=f"platforms to measure (default: every one whose data exists): {', '.join(PLATFORMS)}")
    names = parser.parse_args(argv).platforms
    unknown = [n for n in names if n not in PLATFORMS]
    if unknown:
        parser.error(f"unknown platform(s) {', '.join(unknown)}; choose from {', '.join(PLATFORMS)}")
    results = [measure(n, PLATFORMS[n][0]) for n in names or PLATFORMS if (PLATFORMS[n][0] / "orders").is_dir()]
    for r in results:
        print(r, flush=True)
    write_section("Daily refresh", render(results, {n: g for n, (_, g) in PLATFORMS.items()}))


if __name__ == "__main__":
    main(sys.argv[1:])
