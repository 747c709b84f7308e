"""Run every benchmark in turn: `python -m benchmarks [name ...]`."""

import importlib
import sys

ALL = [
    "bench_simulate",
    "bench_ingest",
    "bench_postgres",
    "bench_features",
    "bench_train",
    "bench_public",
    "bench_limits",
    "bench_explain",
    "bench_service",
    "bench_audit",
    "bench_pipeline",
    "bench_monitor",
]

for name in sys.argv[1:] or ALL:
    module = importlib.import_module(f"benchmarks.{name}")
    module.main()
