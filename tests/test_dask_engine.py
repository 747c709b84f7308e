"""The dask engine gives what the local engine gives: a real LocalCluster of 2 worker processes, real flow runs."""

from __future__ import annotations

import logging

import pytest

from core.settings import ComputeConfig, Settings
from pipelines.compute import on_engine
from pipelines.ingest import IngestResult, ingest_flow
from tests.conftest import SAMPLE


def engine_settings(home, engine: str) -> Settings:
    """A workspace on the local engine, or on a LocalCluster of 2 worker processes started per flow run."""
    return Settings(home=home, compute=ComputeConfig(engine=engine, n_workers=2, memory_limit="2GiB"))


@pytest.fixture(scope="module")
def ingested(prefect_server, tmp_path_factory) -> dict[str, tuple[Settings, IngestResult, str]]:
    """The sample ingested once by each engine: (settings, result, the log of the run) per engine; the
    later stages' tests start from these two workspaces."""
    out = {}
    for engine in ("local", "dask"):
        settings = engine_settings(tmp_path_factory.mktemp(engine) / "home", engine)
        handler, logger = _Capture(), logging.getLogger("pipelines.compute")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            result = on_engine(ingest_flow, settings)(source=str(SAMPLE), settings=settings)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        out[engine] = (settings, result, "\n".join(handler.lines))
    return out


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_ingest_on_a_cluster_of_two_workers_gives_the_local_snapshot(ingested):
    (_, local, local_log), (_, dask, dask_log) = ingested["local"], ingested["dask"]
    assert dask.snapshot_id == local.snapshot_id is not None
    assert dask.store_rows == local.store_rows and sum(local.store_rows.values()) > 1_000_000
    assert "Dask dashboard: http://127.0.0.1:" in dask_log and "(2 workers)" in dask_log
    assert "Dask dashboard" not in local_log  # the local engine starts no cluster
