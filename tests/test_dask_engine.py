"""The dask engine gives what the local engine gives: a real LocalCluster of worker processes, real flow runs."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest

from core.settings import ComputeConfig, Settings
from pipelines.compute import on_engine
from pipelines.ingest import ingest_flow
from tests.conftest import SAMPLE

NOW = datetime(2030, 1, 1)


def _settings(home, engine: str) -> Settings:
    return Settings(home=home, compute=ComputeConfig(engine=engine, n_workers=2, memory_limit="2GiB"))


@pytest.mark.slow
def test_ingest_on_a_cluster_of_two_workers_gives_the_local_snapshot(prefect_server, tmp_path, caplog):
    local = on_engine(ingest_flow, _settings(tmp_path / "local", "local"))(
        source=str(SAMPLE), settings=_settings(tmp_path / "local", "local"))
    with caplog.at_level(logging.INFO, logger="pipelines.compute"):
        dask = on_engine(ingest_flow, _settings(tmp_path / "dask", "dask"))(
            source=str(SAMPLE), settings=_settings(tmp_path / "dask", "dask"))
    assert dask.snapshot_id == local.snapshot_id is not None
    assert dask.store_rows == local.store_rows and sum(local.store_rows.values()) > 1_000_000
    assert "Dask dashboard: http://127.0.0.1:" in caplog.text and "(2 workers)" in caplog.text
