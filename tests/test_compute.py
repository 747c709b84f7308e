"""How a flow waits on its partitions on the dask engine."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from prefect import flow

from core.settings import ComputeConfig, Settings
from pipelines.compute import on_engine, run_partitions


def _slow_square(x: int) -> int:
    time.sleep(0.5)
    return x * x


@flow(name="squares")
def _squares(settings: Settings) -> list[int]:
    return run_partitions(_slow_square, range(6), "squares")


def test_waiting_on_partitions_arms_no_alarm_in_the_flow_process(tmp_path, prefect_server):
    """Prefect's `wait(timeout=...)` arms SIGALRM in the main thread on every call; an alarm landing while a
    lock was re-taken failed a 100M-order ingest with "release unlocked lock". The flow must wait without it."""
    settings = Settings(home=tmp_path / "home", compute=ComputeConfig(engine="dask", n_workers=1, memory_limit="1GiB"))
    armed: list[float] = []
    waiting = threading.Event()

    def watch() -> None:
        while not waiting.is_set():
            seconds, _ = signal.getitimer(signal.ITIMER_REAL)
            if seconds:
                armed.append(seconds)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert on_engine(_squares, settings)(settings=settings) == [x * x for x in range(6)]
    finally:
        waiting.set()
        watcher.join()
    assert not armed, f"an alarm timer was armed {len(armed)} times while the flow waited on its partitions"


def _greedy(item: str) -> int:
    """A query DuckDB cannot spill (one list of every row) on a connection with its process's budget."""
    from core.sql import duckdb_connect

    return len(duckdb_connect().execute("SELECT list(range) FROM range(20_000_000)").fetchall())


def test_duckdb_out_of_memory_on_a_worker_names_the_workers_budget(tmp_path):
    """Translated on the worker, whose budget it was: the flow gets the one line, not DuckDB's exception."""
    import dask
    from distributed import Client, LocalCluster

    from core.sql import OutOfMemoryError
    from pipelines.compute import _apply, _Work

    unmanaged = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with dask.config.set(unmanaged), LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit="64MiB", processes=False, dashboard_address=None,
            local_directory=tmp_path / "dask") as cluster, Client(cluster) as client:
        future = client.submit(_apply, _Work(_greedy, "orders", "features as of 2024-01-01"), pure=False)
        with pytest.raises(OutOfMemoryError) as error:
            future.result()
    assert str(error.value).startswith("DuckDB ran out of memory in features as of 2024-01-01 (orders) on a Dask "
                                       "worker: its budget was 32.0 MiB, 50% of the worker's memory limit (64 MiB")
