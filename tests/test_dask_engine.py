"""The dask engine gives what the local engine gives: a real LocalCluster of 2 worker processes, real flow runs."""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import mlflow
import numpy as np
import pandas as pd
import pytest
from prefect import flow
from sklearn.metrics import roc_auc_score

from core.raw_store import RawStore
from core.settings import ComputeConfig, FeaturesConfig, ModelConfig, PathsConfig, Settings
from pipelines.compute import on_engine
from pipelines.ingest import IngestResult, ingest_flow
from tests.conftest import REPO, SAMPLE


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


# --- features, training, scores, limits and reason codes (per merchant bucket) ---

TWO_WORKERS = {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB"}


def workspace(home: Path, raw: Path, engine: str, **compute: object) -> Settings:
    """A workspace on the shared sample raw store; small search so a dask fit stays quick."""
    return Settings(
        home=home, policy_file=REPO / "policy.toml", paths=PathsConfig(raw_store=raw),
        features=FeaturesConfig(snapshot_months=1), model=ModelConfig(max_rounds=200, search_trials=1),
        compute=ComputeConfig(engine=engine, **{**TWO_WORKERS, **compute}),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def sample_raw(ingested) -> Path:
    """The raw store the local engine ingested the sample into (`ingested`); the workspaces below read it."""
    return ingested["local"][0].path("raw_store")


@pytest.fixture(scope="module")
def engines(sample_raw, tmp_path_factory, prefect_server) -> dict[str, tuple[Settings, object]]:
    """Features built and a model trained on each engine (the dask one forced onto `lightgbm.dask`)."""
    from pipelines.compute import on_engine
    from pipelines.features import build_features_flow
    from pipelines.train import train_flow

    out = {}
    for engine, compute in (("local", {}), ("dask", {"train_in_memory_rows": 1})):
        settings = workspace(tmp_path_factory.mktemp(engine) / "home", sample_raw, engine, **compute)
        build = on_engine(build_features_flow, settings)(settings=settings)
        outcome = on_engine(train_flow, settings)(settings=settings)
        out[engine] = (settings, build, outcome)
    return out


def test_features_do_not_depend_on_duckdb_threads_or_batches(sample_raw):
    """Sums of amounts and durations are exact, so the bits of a feature do not depend on the order DuckDB
    adds its facts in (before: 18% of these rows differed in net_sales_30d between 1 and 4 threads)."""
    from features.labels import application_outcomes
    from features.training_set import compute_features, normalise_entities, table_readers

    store = RawStore(sample_raw)
    entities = normalise_entities(application_outcomes(store))
    frames = []
    for threads, batch_rows in ((1, 200_000), (4, 5_000)):
        con = duckdb.connect(config={"threads": threads})
        frames.append(compute_features(entities, table_readers(store, con), batch_rows, con=con)
                      .sort_values(["merchant_id", "as_of"], ignore_index=True))
    for other in frames[1:]:
        pd.testing.assert_frame_equal(other, frames[0], check_exact=True)


@pytest.mark.slow
def test_feature_files_are_bit_equal_on_both_engines_and_to_one_whole_query(engines, sample_raw):
    (_, local, _), (_, dask, _) = engines["local"], engines["dask"]
    assert local.training_set.read_bytes() == dask.training_set.read_bytes()
    assert local.online.read_bytes() == dask.online.read_bytes()
    assert [p.read_bytes() for p in local.snapshots] == [p.read_bytes() for p in dask.snapshots]

    from features.labels import application_outcomes
    from features.training_set import get_training_set

    store = RawStore(sample_raw)
    whole = get_training_set(application_outcomes(store), store)  # no buckets: one query over every file
    pd.testing.assert_frame_equal(pd.read_parquet(local.training_set), whole, check_exact=True)
    assert store.buckets == 8 and len(whole) > 20_000


@pytest.mark.slow
def test_lightgbm_dask_model_is_recorded_and_scores_like_the_local_one(engines):
    aucs = {}
    for engine, (settings, _, outcome) in engines.items():
        run = mlflow.MlflowClient(settings.tracking_uri).get_run(outcome.run_id)
        assert run.data.tags["training_engine"] == ("lightgbm.dask" if engine == "dask" else "local")
        reason = run.data.tags["training_engine_reason"]
        assert ("> [compute] train_in_memory_rows 1:" if engine == "dask" else "engine 'local'") in reason
        aucs[engine] = outcome.metrics["test_auc"]
    # Both calibrate, explain and go through the same gates (the dask model's verdict may differ: on one run
    # of `make test` it failed the grade monotonicity on the test rows). Their AUCs differ: each worker bags
    # its own rows and bins its features on its own rows. On the sample that moves the OOT AUC by
    # 0.002-0.008 (the spread of the local engine over seeds 42-44 is 0.007); issue 15 asks for 0.002, not met.
    local_checks, dask_checks = (engines[e][2].decision.reasons for e in ("local", "dask"))
    assert len(dask_checks) == len(local_checks) and all(r.startswith(("pass:", "fail:")) for r in dask_checks)
    assert abs(aucs["dask"] - aucs["local"]) <= 0.01, aucs


@pytest.mark.slow
def test_dask_boosters_without_bagging_come_close_to_the_local_oot_auc(engines):
    """Without bagging only the bins differ (each worker finds those of some features on its own rows):
    measured 0.0000 and 0.0023 on two runs of the sample."""
    from distributed import Client, LocalCluster

    from features.offline_store import training_frame
    from models.pd_model import prepare_features
    from models.registry import CHAMPION, load_pd_model
    from models.splits import time_split
    from models.training import DEFAULT_CANDIDATE, refit_booster

    settings, _, _ = engines["local"]
    frame = training_frame(settings)
    model = load_pd_model(settings, CHAMPION)
    X = prepare_features(frame, model.features)
    y = frame["defaulted"].to_numpy()
    test = (time_split(frame["as_of"], 2, 2) == "test").to_numpy()
    params = {**DEFAULT_CANDIDATE, "bagging_fraction": 1.0}
    local = refit_booster(X[~test], y[~test], model.features, params, 42, 40)
    with LocalCluster(processes=True, host="127.0.0.1", dashboard_address=None, **TWO_WORKERS) as cluster, \
            Client(cluster) as client:
        dask = refit_booster(X[~test], y[~test], model.features, params, 42, 40, client=client)
    auc = [roc_auc_score(y[test], b.predict(X[test], raw_score=True)) for b in (local, dask)]
    assert abs(auc[1] - auc[0]) <= 0.004, auc


@pytest.mark.slow
def test_limits_per_partition_on_dask_equal_the_local_engine(engines):
    from pipelines.compute import on_engine
    from pipelines.limits import limits_flow

    settings, _, _ = engines["local"]
    local = on_engine(limits_flow, settings)(settings=settings)
    local_bytes = local.path.read_bytes()
    on_dask = settings.model_copy(update={"compute": ComputeConfig(engine="dask", **TWO_WORKERS)})
    dask = on_engine(limits_flow, on_dask)(settings=on_dask)
    assert dask.path == local.path and dask.path.read_bytes() == local_bytes
    assert np.isclose(pd.read_parquet(local.path)["pd"], pd.read_parquet(dask.path)["pd"]).all()


@pytest.mark.slow
def test_reason_codes_per_merchant_bucket_equal_those_of_the_whole(engines):
    from explanation.reason_codes import ReasonCodeIndex, population_reasons
    from models.registry import CHAMPION, load_pd_model
    from pipelines.limits import merchant_parts

    settings, build, _ = engines["local"]
    model = load_pd_model(settings, CHAMPION)
    snapshot = pd.read_parquet(build.online)
    parts = merchant_parts(snapshot, 8)
    assert len(parts) == 8 and sum(map(len, parts)) == len(snapshot)
    whole = ReasonCodeIndex.for_population(model, snapshot, "1")
    split = ReasonCodeIndex.from_parts([population_reasons(model, part) for part in parts], model, "1")
    pd.testing.assert_frame_equal(split.table, whole.table, check_exact=True)
    assert split.metadata == whole.metadata


@flow(name="workers-lost")
def _workers_lost(settings: Settings) -> list[int]:
    """Partitions submitted to a cluster whose only worker is gone, as when a loaded scheduler drops it."""
    from pipelines.compute import dask_client, run_partitions

    client = dask_client()
    client.retire_workers(list(client.scheduler_info()["workers"]), close_workers=True, remove=True)
    return run_partitions(abs, [-1, -2], "lost partitions")


def test_a_flow_whose_cluster_lost_its_workers_fails_with_the_reason_instead_of_waiting(tmp_path, prefect_server):
    from pipelines.compute import EngineError

    settings = Settings(home=tmp_path / "home",
                        compute=ComputeConfig(engine="dask", n_workers=1, memory_limit="1GiB"))
    with pytest.raises(EngineError, match=r"has no workers left, so lost partitions cannot finish \(2 of 2"):
        on_engine(_workers_lost, settings)(settings=settings)
