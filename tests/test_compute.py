"""How a flow waits on its partitions on the dask engine."""

from __future__ import annotations

import signal
import threading
import time

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
