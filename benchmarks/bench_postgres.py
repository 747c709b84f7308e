"""Pulling from PostgreSQL against reading the same tables from Parquet, on the sample platform.

A throwaway cluster (`testkit.postgres`) is loaded with data_samples/platform (`core.postgres.load_folder`).
Then, each in its own child process (so the peak RSS is its own): every table streamed from the database
(`PostgresSource.batches`) against the same tables streamed from the Parquet folder (`FolderSource`), and a
whole ingest from each, then a second pull from the database with nothing new (the overlap only). CPU
seconds are the client's (the server's work shows in wall seconds only).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import run_measured, write_section

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "platform"


def _stream(source_text: str) -> None:
    """Child: every table of the source, batch by batch, dropped as read."""
    from core.sources import open_source

    start, cpu = time.perf_counter(), time.process_time()
    source = open_source(source_text)
    rows = sum(batch.num_rows for name in source.tables() for batch in source.batches(name))
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}))


def _ingest(source_text: str, home: str) -> None:
    """Child: a full ingest into an empty workspace, then (from a database) the next pull, with nothing new."""
    from core.settings import Settings
    from pipelines.ingest import ingest
    from pipelines.runtime import prepare_environment

    settings = Settings(home=Path(home))
    prepare_environment(settings)
    import great_expectations  # noqa: F401  (import time is not ingest time)

    runs = []
    for _ in range(2 if "://" in source_text else 1):
        start, cpu = time.perf_counter(), time.process_time()
        result = ingest(source_text, settings)
        runs.append({"rows": sum(result.rows.values()), "seconds": time.perf_counter() - start,
                     "cpu": time.process_time() - cpu})
    print(json.dumps(runs))


def _child(*args: str) -> tuple[float, str]:
    _, peak_mb, out = run_measured([sys.executable, "-m", "benchmarks.bench_postgres", *args],
                                   env={"PGPASSWORD": os.environ.get("PGPASSWORD", "")})
    return peak_mb, out.strip().splitlines()[-1]


def main() -> None:
    from core.postgres import load_folder
    from testkit.postgres import cluster

    with cluster() as server:
        url = server.create_database("bench")
        start, cpu = time.perf_counter(), time.process_time()
        loaded = load_folder(url, SAMPLE)
        load_s, load_cpu = time.perf_counter() - start, time.process_time() - cpu
        os.environ["PGPASSWORD"] = server.password
        bare = server.url("bench", password=False)
        pull_mb, pull = _child("stream", bare)
        files_mb, files = _child("stream", str(SAMPLE))
        with tempfile.TemporaryDirectory() as tmp:
            ingest_db_mb, ingest_db = _child("ingest", bare, f"{tmp}/db")
            ingest_files_mb, ingest_files = _child("ingest", str(SAMPLE), f"{tmp}/files")
    pull, files = json.loads(pull), json.loads(files)
    (first, again), (from_files,) = json.loads(ingest_db), json.loads(ingest_files)
    load = os.getloadavg()[0]
    rows = sum(loaded.values())
    table = [
        "| step | rows | wall s | client CPU s | peak MB |",
        "|---|---|---|---|---|",
        f"| load into PostgreSQL (`simulate --out`'s upsert) | {rows:,} | {load_s:.1f} | {load_cpu:.1f} | |",
        f"| stream every table from PostgreSQL | {pull['rows']:,} | {pull['seconds']:.1f} | {pull['cpu']:.1f} | "
        f"{pull_mb:,.0f} |",
        f"| stream every table from Parquet (baseline) | {files['rows']:,} | {files['seconds']:.1f} | "
        f"{files['cpu']:.1f} | {files_mb:,.0f} |",
        f"| ingest from PostgreSQL, first pull | {first['rows']:,} | {first['seconds']:.1f} | {first['cpu']:.1f} | "
        f"{ingest_db_mb:,.0f} |",
        f"| ingest from PostgreSQL, next pull (nothing new: the overlap) | {again['rows']:,} | "
        f"{again['seconds']:.1f} | {again['cpu']:.1f} | |",
        f"| ingest from Parquet (baseline) | {from_files['rows']:,} | {from_files['seconds']:.1f} | "
        f"{from_files['cpu']:.1f} | {ingest_files_mb:,.0f} |",
    ]
    ratio = first["cpu"] / from_files["cpu"]
    body = "\n".join([
        "`python -m benchmarks.bench_postgres`: data_samples/platform loaded into a throwaway PostgreSQL cluster",
        "on loopback, then, each in its own process: every table streamed from the database (ADBC, binary",
        "COPY, ~16 MB Arrow batches) and from the Parquet folder, and a whole ingest from each; from the",
        "database also the next pull, which finds nothing new and re-reads the overlap window only. Client CPU",
        f"seconds (the server's work is in the wall seconds). Load average {load:.1f}.",
        "",
        *table,
        "",
        f"Goal: an ingest from PostgreSQL costs the client at most 1.25x the CPU of the same rows from Parquet: "
        f"{ratio:.2f}x ({'met' if ratio <= 1.25 else '**not met**'}).",
    ])  # fmt: skip
    print(body)
    write_section("PostgreSQL source", body)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        {"stream": _stream, "ingest": _ingest}[sys.argv[1]](*sys.argv[2:])
    else:
        main()
