"""The dask engine gives what the local engine gives: a real LocalCluster of 2 worker processes, real flow runs."""

from __future__ import annotations

from pathlib import Path

import duckdb
import mlflow
import numpy as np
import pandas as pd
import pytest
from prefect import flow

from core.raw_store import RawStore
from core.settings import ComputeConfig, FeaturesConfig, ModelConfig, PathsConfig, Settings
from pipelines.compute import on_engine
from pipelines.ingest import IngestResult, ingest_flow
from tests.conftest import REPO, SAMPLE, captured_log

TWO_WORKERS = {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB"}


@pytest.fixture(scope="module")
def ingested(sample_run, tmp_path_factory) -> dict[str, tuple[Settings, IngestResult, str]]:
    """The sample ingested by each engine: (settings, result, the log of the run) per engine. The local
    engine's is the session's `scfrisk run` on the sample (`sample_run`; its result read back by ingesting
    the same batch again, which loads nothing); the dask engine's runs here, on the LocalCluster its flow run
    starts."""
    local, _, local_log = sample_run
    out = {"local": (local, ingest_flow(source=str(SAMPLE), settings=local), local_log)}
    settings = Settings(home=tmp_path_factory.mktemp("dask") / "home",
                        compute=ComputeConfig(engine="dask", **TWO_WORKERS))  # type: ignore[arg-type]
    with captured_log("pipelines.compute") as log:
        result = on_engine(ingest_flow, settings)(source=str(SAMPLE), settings=settings)
    out["dask"] = (settings, result, "\n".join(log))
    return out


@pytest.mark.slow
def test_ingest_on_a_cluster_of_two_workers_gives_the_local_snapshot(ingested):
    (_, local, local_log), (_, dask, dask_log) = ingested["local"], ingested["dask"]
    assert dask.snapshot_id == local.snapshot_id is not None
    assert dask.store_rows == local.store_rows and sum(local.store_rows.values()) > 1_000_000
    assert "Dask dashboard: http://127.0.0.1:" in dask_log and "(2 workers)" in dask_log
    assert "Dask dashboard" not in local_log  # the local engine starts no cluster


# --- features, training, scores, limits and reason codes (per merchant bucket) ---


def workspace(home: Path, raw: Path, engine: str, **compute: object) -> Settings:
    """A workspace on the shared sample raw store; small search so a dask fit stays quick."""
    return Settings(
        home=home, policy_file=REPO / "policy.toml", paths=PathsConfig(raw_store=raw),
        features=FeaturesConfig(snapshot_months=1), model=ModelConfig(max_rounds=200, search_trials=1),
        compute=ComputeConfig(engine=engine, **{**TWO_WORKERS, **compute}),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def sample_raw(sample_run) -> Path:
    """The raw store the local engine ingested the sample into (`sample_run`); the workspaces below read it."""
    return sample_run[0].path("raw_store")


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 worker processes that the dask flow runs below reach at its address (`[compute]
    address`, as on a user's own cluster): a cluster per flow run costs more to start than the sample's work on
    it. The ingest above starts its own, to check the LocalCluster a flow run starts itself."""
    from distributed import LocalCluster

    with LocalCluster(processes=True, host="127.0.0.1", dashboard_address=None, **TWO_WORKERS) as running:
        yield running


@pytest.fixture(scope="module")
def engines(sample_raw, tmp_path_factory, prefect_server, cluster) -> dict[str, tuple[Settings, object]]:
    """Features built and a model trained on each engine (the dask one forced onto data-parallel LightGBM, on
    the module's cluster)."""
    from pipelines.compute import on_engine
    from pipelines.features import build_features_flow
    from pipelines.train import train_flow

    def build_and_train(settings: Settings) -> tuple[Settings, object, object]:
        build = on_engine(build_features_flow, settings)(settings=settings)
        return settings, build, on_engine(train_flow, settings)(settings=settings)

    out = {"local": build_and_train(workspace(tmp_path_factory.mktemp("local") / "home", sample_raw, "local"))}
    out["dask"] = build_and_train(workspace(tmp_path_factory.mktemp("dask") / "home", sample_raw, "dask",
                                            train_in_memory_rows=1, address=cluster.scheduler_address))
    return out


def test_features_do_not_depend_on_duckdb_threads_or_batches(sample_raw):
    """Sums of amounts and durations are exact, so the bits of a feature do not depend on the order DuckDB
    adds its facts in (before: 18% of the sample's rows differed in net_sales_30d between 1 and 4 threads).
    On one merchant bucket of the sample (an eighth, 2,858 applications: a file per month and table, enough
    for 4 threads; with floating-point sums 95% of its rows differ, in one batch as in 3), in one batch on 1
    thread, then in batches of 1,000 rows on 4."""
    from features.labels import application_outcomes
    from features.training_set import compute_features, normalise_entities, table_readers

    store = RawStore(sample_raw)
    entities = normalise_entities(application_outcomes(store, buckets=[0]))
    frames = []
    for threads, batch_rows in ((1, 200_000), (4, 1_000)):
        con = duckdb.connect(config={"threads": threads})
        frames.append(compute_features(entities, table_readers(store, con, buckets=[0]), batch_rows, con=con)
                      .sort_values(["merchant_id", "as_of"], ignore_index=True))
    assert len(frames[0]) > 2_000  # 3 batches on 4 threads
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
def test_data_parallel_model_is_recorded_and_scores_like_the_local_one(engines):
    aucs = {}
    for engine, (settings, _, outcome) in engines.items():
        run = mlflow.MlflowClient(settings.tracking_uri).get_run(outcome.run_id)
        assert run.data.tags["training_engine"] == engine
        reason = run.data.tags["training_engine_reason"]
        assert ("> [compute] train_in_memory_rows 1:" if engine == "dask" else "engine 'local'") in reason
        aucs[engine] = outcome.metrics["test_auc"]
    # Both calibrate, explain and go through the same gates (the dask model's verdict may differ). Bins, bags
    # and the first tree are the local ones (test below), and both run LightGBM's "basic" monotone constraints,
    # the only ones of its data-parallel learner (before: "intermediate" locally, 0.7619 vs 0.7660 on the
    # cluster). What is left is LightGBM's: its serial learner skips, below a leaf, a feature that had no valid
    # split in that leaf and the data-parallel one does not, and the data-parallel one estimates leaf row counts
    # (`min_child_samples`) from hessian sums. Measured on the sample, seeds 42-45: 0.0002-0.0015 apart.
    local_checks, dask_checks = (engines[e][2].decision.reasons for e in ("local", "dask"))
    assert len(dask_checks) == len(local_checks) and all(r.startswith(("pass:", "fail:")) for r in dask_checks)
    assert abs(aucs["dask"] - aucs["local"]) <= 0.002, aucs


def test_lightgbm_seeds_are_the_ones_lightgbm_derives_from_seed():
    """A worker's bagging seed is shifted from the one LightGBM derives from `seed`: the derivation must be
    LightGBM's, or every worker's bags move."""
    import lightgbm as lgb

    from models.distributed import lightgbm_seeds

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(3000, 4)), rng.integers(0, 2, 3000)
    params = {"objective": "binary", "bagging_fraction": 0.5, "bagging_freq": 1, "verbosity": -1, "seed": 7}
    trees = [lgb.train(p, lgb.Dataset(X, y), 5).dump_model()["tree_info"]
             for p in (params, {**params, "bagging_seed": lightgbm_seeds(7)["bagging_seed"]},
                       {**params, "bagging_seed": lightgbm_seeds(7)["bagging_seed"] + 1})]
    assert trees[0] == trees[1] and trees[0] != trees[2]


@pytest.mark.slow
def test_a_data_parallel_round_bins_and_bags_every_row_as_one_process_does(cluster):
    """The first tree, on 2 workers, with bagging and a leaf of one row allowed: the same tree as in one
    process. Before: `lightgbm.dask`, whose workers bin on their own rows and repeat each other's bags."""
    import lightgbm as lgb
    from distributed import Client

    from models.distributed import binned, fit_on_cluster

    rng = np.random.default_rng(3)
    X = pd.DataFrame(rng.normal(size=(5000, 6)), columns=list("abcdef")).round(2)
    X.loc[rng.random(5000) < 0.2, "c"] = np.nan
    y = (rng.random(5000) < 1 / (1 + np.exp(2 - X["a"].fillna(0)))).to_numpy().astype(int)
    params = {"objective": "binary", "bagging_fraction": 0.5, "bagging_freq": 1, "feature_fraction": 0.7,
              "min_data_in_leaf": 1, "num_leaves": 15, "deterministic": True, "force_col_wise": True,
              "verbosity": -1, "seed": 42, "num_threads": 1}
    local = lgb.train(params, binned(X, y, params, None), 1)
    with Client(cluster.scheduler_address) as client:
        client.wait_for_workers(2)
        spread = fit_on_cluster(client, params, X, y, 1)

    def tree(booster: lgb.Booster) -> dict:  # the counts a data-parallel learner estimates are left out
        text = booster.model_to_string().split("Tree=0")[1].split("end of trees")[0]
        return {k: v for k, v in (line.split("=", 1) for line in text.splitlines() if "=" in line)
                if not k.endswith("count")}

    assert tree(spread) == tree(local)


def test_bucket_parts_merge_into_the_order_of_the_whole(tmp_path, monkeypatch):
    """The feature store's files from part files written where the buckets are computed: the rows and types
    of the concatenated, sorted parts, whatever the chunks the merge holds (an empty bucket, a column that is
    integer in one bucket and float with a missing value in another, one all missing in a bucket)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    import features.offline_store as offline

    monkeypatch.setattr(offline, "WRITE_ROWS", 7)
    monkeypatch.setattr(offline, "PART_ROWS", 3)
    rng = np.random.default_rng(1)
    frames = []
    for bucket, rows in enumerate((0, 5, 13, 9)):
        frame = pd.DataFrame({"as_of": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 5, rows), "D"),
                              "application_id": [f"a{bucket}-{i}" for i in range(rows)],
                              "x": rng.integers(0, 9, rows),
                              "t": [None if bucket == 1 else f"s{i}" for i in range(rows)]})
        if bucket == 2:
            frame.loc[0, "x"] = np.nan
        frames.append(frame)
    disk = pafs.LocalFileSystem()
    parts = [offline.stored_part(frames.__getitem__, offline.TRAINING_ORDER, str(tmp_path), disk, b) for b in range(4)]
    merged = offline.write_in_order(parts, offline.TRAINING_ORDER, str(tmp_path / "merged.parquet"), {"as_of": "x"},
                                    disk)
    whole = pd.concat(frames[1:], ignore_index=True).sort_values(offline.TRAINING_ORDER, ignore_index=True)
    pq.write_table(pa.Table.from_pandas(whole, preserve_index=False), tmp_path / "whole.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(merged), pd.read_parquet(tmp_path / "whole.parquet"),
                                  check_exact=True)
    assert pq.ParquetFile(merged).metadata.num_row_groups == 4 and offline.read_metadata(merged) == {"as_of": "x"}


@pytest.mark.slow
def test_limits_per_partition_on_dask_equal_the_local_engine(engines, cluster):
    from pipelines.compute import on_engine
    from pipelines.limits import limits_flow

    settings, _, _ = engines["local"]
    local = on_engine(limits_flow, settings)(settings=settings)
    local_bytes = local.path.read_bytes()
    on_dask = settings.model_copy(update={"compute": ComputeConfig(engine="dask", address=cluster.scheduler_address,
                                                                   **TWO_WORKERS)})
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


def test_the_local_fit_uses_the_monotone_method_of_lightgbms_data_parallel_learner():
    """LightGBM runs only the "basic" monotone constraints data-parallel: its `Config` switches another method
    to "basic" when `num_machines` > 1 (the booster each worker builds, `models.distributed`). Before: the local
    fit used "intermediate", so the two engines fitted different models (OOT AUC 0.0041 apart on the sample)."""
    import re

    import lightgbm as lgb

    from models.training import BASE_PARAMS, DEFAULT_CANDIDATE, boost

    rng = np.random.default_rng(0)
    X, y = pd.DataFrame(rng.normal(size=(500, 3)), columns=list("abc")), rng.integers(0, 2, 500)
    params = {**BASE_PARAMS, **DEFAULT_CANDIDATE, "seed": 0, "monotone_constraints": [1, 0, -1]}
    local = boost(params, X, y, 2)
    worker = lgb.Booster({**params, "tree_learner": "data", "num_machines": 2}, lgb.Dataset(X, y))  # no network

    def method(booster: lgb.Booster) -> str:  # as the booster records it, after LightGBM's own checks
        return re.search(r"\[monotone_constraints_method: (\w+)\]", booster.model_to_string()).group(1)

    assert method(local) == method(worker) == "basic"
