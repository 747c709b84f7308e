"""Stores addressed by URL from the settings: `[paths] raw_store` and `feature_store` on a local S3-compatible
server (moto's, `testkit.s3`) and as `file://` URLs give what local folders give, bit for bit."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import sys
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from core.raw_store import RawStore
from core.settings import ConfigError, Settings, load_settings
from features.offline_store import OfflineStore, read_metadata
from features.online_store import ONLINE_FILE, publish_online
from pipelines.cli import run
from tests.conftest import REPO, SAMPLE
from tests.rawdata import write_raw_store
from tests.sample_slice import sample_slice, write_folder
from tests.test_features import TABLES, T

MERCHANTS = 20


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scfrisk.toml"
    path.write_text(text)
    return path


def _invalid(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(_config(tmp_path, text))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_stores_take_urls_and_the_rest_stays_local(tmp_path):
    settings = load_settings(_config(tmp_path, '[paths]\nraw_store = "s3://lake/scfrisk/raw"\n'
                                                'feature_store = "file:///srv/features"\n'
                                                '[storage]\nendpoint_url = "http://127.0.0.1:9000"\n'
                                                'region = "eu-west-1"\nallow_http = true\n'))
    assert settings.store_url("raw_store") == "s3://lake/scfrisk/raw"
    assert settings.storage_options("raw_store") == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "AWS_ALLOW_HTTP": "true"}
    assert settings.path("feature_store") == Path("/srv/features") == Path(settings.store_url("feature_store"))
    assert settings.storage_options("feature_store") == {}  # [storage] is S3's
    with pytest.raises(ConfigError, match="raw_store is s3://lake/scfrisk/raw, not a local folder"):
        settings.path("raw_store")
    default = Settings(home=tmp_path / "ws")
    assert default.store_url("raw_store") == str((tmp_path / "ws").resolve() / "raw")


def test_a_store_url_that_cannot_work_is_one_line_on_load(tmp_path):
    error = _invalid(tmp_path, '[paths]\nraw_store = "ftp://lake/raw"\n')
    assert "'paths.raw_store'" in error and "not ftp://" in error and "s3://" in error
    error = _invalid(tmp_path, '[paths]\npublished = "s3://lake/published"\n')
    assert "'paths.published': must be a local path, not a URL: the service reads its bundles" in error
    error = _invalid(tmp_path, 'home = "s3://lake/home"\n')
    assert "'home': must be a local path, not a URL: MLflow's SQLite file" in error
    if importlib.util.find_spec("gcsfs") is None:
        error = _invalid(tmp_path, '[paths]\nfeature_store = "gs://lake/features"\n')
        assert "needs the gcsfs package, which is not installed" in error


def test_credentials_are_refused_in_the_configuration_without_being_quoted(tmp_path):
    error = _invalid(tmp_path, '[storage]\nsecret_access_key = "hunter2"\n')
    assert "'storage.secret_access_key': credentials do not belong in the configuration" in error
    error = _invalid(tmp_path, '[paths]\nraw_store = "s3://AKIA:hunter2@lake/raw"\n')
    assert "'paths.raw_store': credentials do not belong in a store's URL" in error
    for text in ('[storage]\nsecret_access_key = "hunter2"\n', '[paths]\nraw_store = "s3://AKIA:hunter2@lake/raw"\n'):
        assert "hunter2" not in _invalid(tmp_path, text)


def test_a_bad_scheme_from_the_environment_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCFRISK_PATHS__FEATURE_STORE", "sftp://host/features")
    monkeypatch.setattr(sys, "argv", ["scfrisk", "features", "build"])
    with pytest.raises(SystemExit) as exit_:
        run()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("error: invalid configuration") and "'paths.feature_store'" in line and "sftp://" in line


def test_the_offline_and_online_stores_on_s3_write_what_a_local_folder_holds(bucket, settings):
    local = OfflineStore(settings.path("feature_store"), write_raw_store(settings.path("raw_store"), TABLES))
    remote = OfflineStore(f"s3://{bucket}/features", write_raw_store(f"s3://{bucket}/raw", TABLES))
    assert remote.raw_store.snapshot_id == local.raw_store.snapshot_id

    served = publish_online(remote, T)
    assert served == f"s3://{bucket}/features/{ONLINE_FILE.as_posix()}"
    publish_online(local, T)
    assert remote.fs.cat_file(fsspec.core.strip_protocol(served)) == (local.root / ONLINE_FILE).read_bytes()
    assert read_metadata(fsspec.core.strip_protocol(served), remote.arrow_fs)["raw_snapshot_id"] == (
        remote.raw_store.snapshot_id)
    pd.testing.assert_frame_equal(remote.read(T), local.read(T))
    assert remote.snapshot_files(remote.version) == [remote.snapshot_path(T)]

    path = fsspec.core.strip_protocol(str(remote.snapshot_path(T)))
    written = remote.fs.info(path)["LastModified"]
    remote.fs.invalidate_cache()
    assert remote.materialize(T) == remote.snapshot_path(T) and remote.fs.info(path)["LastModified"] == written


def _built(config: Path) -> dict[str, object]:
    """A workspace's raw snapshot id and its feature files' bytes, as `scfrisk features build` left them."""
    settings = load_settings(config)
    offline = OfflineStore.from_settings(settings)
    training = offline.location(f"version={offline.version}",
                                f"training_set_h{settings.model.label_horizon_months}.parquet")
    return {
        "snapshot": offline.raw_store.snapshot_id,
        "training": offline.fs.cat_file(fsspec.core.strip_protocol(str(training))),
        "online": offline.fs.cat_file(fsspec.core.strip_protocol(str(offline.location(*ONLINE_FILE.parts)))),
        "files": sorted(Path(p).name for p in offline.snapshot_files(offline.version)),
        "rows": len(offline.read_file(training)),
    }


def _cli(*argv: str) -> None:
    sys.argv = ["scfrisk", *argv]
    run()


@pytest.mark.slow
def test_ingest_and_features_build_on_s3_and_file_urls_give_the_local_stores_bits(
    prefect_server, bucket, s3_endpoint, tmp_path, monkeypatch, capsys
):
    """The same batch through `scfrisk ingest` and `scfrisk features build` in three workspaces: local folders,
    `file://` URLs, and S3 whose endpoint is in `[storage]` alone (only the keys in the environment)."""
    if not (SAMPLE / "orders").is_dir():
        pytest.skip("data_samples/platform is not there")
    batch = write_folder(tmp_path / "batch", sample_slice(MERCHANTS))
    # One merchant bucket: a tenth of the files (and of moto's requests) of the default 8, same code path.
    common = '[features]\nsnapshot_months = 1\n[compute]\nmerchant_buckets = 1\n'
    configs = {
        "local": f'home = "{tmp_path / "local"}"\n{common}',
        "file": f'home = "{tmp_path / "file"}"\n[paths]\nraw_store = "{(tmp_path / "lake" / "raw").as_uri()}"\n'
                f'feature_store = "{(tmp_path / "lake" / "features").as_uri()}"\n{common}',
        "s3": f'home = "{tmp_path / "s3"}"\n[paths]\nraw_store = "s3://{bucket}/raw"\n'
              f'feature_store = "s3://{bucket}/features"\n{common}'
              f'[storage]\nendpoint_url = "{s3_endpoint.endpoint}"\nregion = "us-east-1"\nallow_http = true\n',
    }
    for name in ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", sys.argv)
    out = {}
    for name, text in configs.items():
        (tmp_path / name).mkdir()
        config = tmp_path / name / "scfrisk.toml"
        config.write_text(text)
        _cli("-c", str(config), "ingest", "--source", str(batch))
        _cli("-c", str(config), "features", "build")
        out[name] = _built(config)
    capsys.readouterr()
    assert out["local"]["snapshot"] is not None and out["local"]["rows"] > 0 and out["local"]["files"]
    assert out["s3"] == out["local"] and out["file"] == out["local"]
    assert RawStore.from_settings(load_settings(tmp_path / "s3" / "scfrisk.toml")).url == f"s3://{bucket}/raw"
    assert not (tmp_path / "s3" / "raw").exists() and not (tmp_path / "s3" / "features").exists()
    assert not (tmp_path / "file" / "raw").exists() and (tmp_path / "lake" / "raw" / "_manifest.json").is_file()


# --- every later stage on S3, through the CLI: run, refresh (one day), monitor; train in the dask test ---

DAY = pd.Timestamp("2025-10-15")
RUN_MERCHANTS = 300
"""Enough merchants of the sample for a model to train and a loan to monitor, few enough for a quick run."""
STAGES = ('[features]\nsnapshot_months = 1\n[compute]\nmerchant_buckets = 2\n'
          '[model]\nmax_rounds = 60\nsearch_trials = 1\n'
          '[gates]\nmax_ece = 0.5\nmax_score_psi = 5.0\nrequire_monotone_grades = false\n')
"""Two merchant buckets (two partitions per month for the dask workers to share); a small model search whose
models the gates let through, so each workspace has a champion to decide with."""


def _workspace(home: Path, stores: str = "") -> Path:
    """A workspace's `scfrisk.toml`: its home, the repository's credit policy, `stores` (`[paths]`, `[storage]`)."""
    home.mkdir(parents=True)
    config = home / "scfrisk.toml"
    config.write_text(f'home = "{home}"\npolicy_file = "{REPO / "policy.toml"}"\n{STAGES}{stores}')
    return config


def _s3_stores(bucket: str, prefix: str) -> str:
    return f'[paths]\nraw_store = "s3://{bucket}/{prefix}/raw"\nfeature_store = "s3://{bucket}/{prefix}/features"\n'


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint):
    """One bucket for this module's workspaces; endpoint and keys in the `AWS_*` variables (so in every Dask
    worker's environment too), as on real S3."""
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_endpoint.environment().items():
            patch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="stages")
        yield "stages"


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, Path]:
    """The sample's first merchants cut at DAY: the base known before it, and the day's pull."""
    from testkit.daily import split_day

    if not (SAMPLE / "orders").is_dir():
        pytest.skip("data_samples/platform is not there")
    root = tmp_path_factory.mktemp("days")
    split_day(SAMPLE, DAY, root / "base", root / "day", merchants=RUN_MERCHANTS)
    return {"base": root / "base", "day": root / "day"}


def _frame(path: Path | str) -> pd.DataFrame:
    return pd.read_parquet(path)


def _metrics(config: Path) -> dict[str, dict[str, float]]:
    """Each registered version's MLflow metrics (but durations)."""
    from mlflow import MlflowClient

    settings = load_settings(config)
    client = MlflowClient(settings.tracking_uri)
    versions = client.search_model_versions(f"name = '{settings.mlflow.registered_model}'")
    return {v.version: {k: m for k, m in client.get_run(v.run_id).data.metrics.items() if "seconds" not in k}
            for v in versions}


def _outputs(config: Path) -> dict[str, object]:
    """What a workspace's stages produced, comparable across workspaces (no paths, ids of runs or times):
    every bundle's tables and manifest facts in publishing order, the models' metrics, the raw snapshot."""
    from serving.bundle import ALERTS_FILE, BUNDLES_DIR, FEATURES_FILE, LIMITS_FILE, read_manifest

    settings = load_settings(config)
    out: dict[str, object] = {"snapshot": RawStore.from_settings(settings).snapshot_id, "metrics": _metrics(config)}
    out["bundles"] = []
    for bundle in config.parent.joinpath("bundles_in_order").read_text().split():
        folder = settings.path("published") / BUNDLES_DIR / bundle
        manifest = read_manifest(folder)
        tables = {name: _frame(folder / name) for name in (FEATURES_FILE, LIMITS_FILE, ALERTS_FILE)
                  if (folder / name).is_file()}
        out["bundles"].append({"tables": tables, **{k: manifest.get(k) for k in (
            "model_version", "feature_set_version", "features_as_of", "alerts_as_of")}})
    return out


def _stages(config: Path, days: dict[str, Path]) -> tuple[dict[str, str], dict[str, object]]:
    """`scfrisk run` on the base, then `refresh` with the day's pull and `monitor` the day after (the refresh
    already published its own day's alerts, so a monitor of that day changes nothing): each command's output,
    the features `run` built (`_built`) and the metrics of its model; the bundles published in turn are listed
    in `bundles_in_order` beside the configuration. No `train` and no `limits` after `run`: `run` already ran
    both flows (`train_flow`, and `limits_flow` as of the same day `scfrisk limits` defaults to, the last month
    start) on these S3 stores, its limits are compared exactly in its bundle, and `scfrisk train` itself with
    both stores on S3 is the dask test's."""
    published = load_settings(config).path("published") / "CURRENT"
    order, said = [], {}
    for argv in (["run", "--source", str(days["base"])],
                 ["refresh", "--source", str(days["day"])], ["monitor", "--as-of", "2025-10-17"]):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            _cli("-c", str(config), *argv)
        said[argv[0]] = out.getvalue()
        if argv[0] == "run":  # kept in memory: another pytest session may remove this one's old folders
            built = {**_built(config), "metrics": _metrics(config)}
        live = published.read_text().strip()
        if not order or order[-1] != live:
            order.append(live)
    config.parent.joinpath("bundles_in_order").write_text("\n".join(order))
    return said, built


@pytest.fixture(scope="module")
def stages(prefect_server, s3_bucket, days, tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """The same stages in a local workspace and in one whose stores are both on S3: (configuration, what each
    command said, the features `run` built)."""
    root = tmp_path_factory.mktemp("stages")
    configs = {"local": _workspace(root / "local"), "s3": _workspace(root / "s3", _s3_stores(s3_bucket, "ws"))}
    argv = sys.argv
    try:
        return {name: (config, *_stages(config, days)) for name, config in configs.items()}
    finally:
        sys.argv = argv


def _same(got: dict[str, object], want: dict[str, object]) -> None:
    assert got["snapshot"] == want["snapshot"] is not None
    assert got["metrics"] == want["metrics"] and len(want["metrics"]) == 1  # run's model
    assert len(got["bundles"]) == len(want["bundles"]) == 3  # run, refresh, monitor
    assert [b["alerts_as_of"] for b in want["bundles"]][1:] == ["2025-10-16T00:00:00", "2025-10-17T00:00:00"]
    for mine, theirs in zip(got["bundles"], want["bundles"], strict=True):
        assert {k: v for k, v in mine.items() if k != "tables"} == {k: v for k, v in theirs.items() if k != "tables"}
        assert mine["tables"].keys() == theirs["tables"].keys()
        for name, table in theirs["tables"].items():
            pd.testing.assert_frame_equal(mine["tables"][name], table, check_exact=True, obj=name)


@pytest.mark.slow
def test_run_refresh_and_monitor_on_s3_give_the_local_workspace_results(stages):
    (local, local_said, local_built), (s3, s3_said, s3_built) = stages["local"], stages["s3"]
    assert s3_built == local_built and local_built["rows"] > 0
    _same(_outputs(s3), _outputs(local))
    assert "published bundle" in s3_said["run"] and "refreshed to 2025-10-16" in s3_said["refresh"]
    first = [said["monitor"].splitlines()[0].split(" -> ")[0] for said in (s3_said, local_said)]
    assert first[0] == first[1]
    settings = load_settings(s3)
    assert not (settings.home_dir / "raw").exists()
    offline = OfflineStore.from_settings(settings)
    assert offline.fs.exists(fsspec.core.strip_protocol(str(offline.location(*ONLINE_FILE.parts))))


@pytest.mark.slow
def test_the_dask_engine_on_two_workers_with_the_stores_on_s3_gives_the_local_engine_on_disk(
        stages, s3_bucket, days, tmp_path, monkeypatch, caplog):
    """Ingest, features and training on a LocalCluster of 2 worker processes, which open the S3 stores
    themselves from the settings and the `AWS_*` variables of their environment (no [storage] here)."""
    config = _workspace(tmp_path / "dask", _s3_stores(s3_bucket, "dask"))
    monkeypatch.setenv("SCFRISK_COMPUTE__ENGINE", "dask")
    monkeypatch.setenv("SCFRISK_COMPUTE__N_WORKERS", "2")
    monkeypatch.setenv("SCFRISK_COMPUTE__MEMORY_LIMIT", "2GiB")
    monkeypatch.setattr(sys, "argv", sys.argv)
    caplog.set_level(logging.INFO, logger="pipelines.compute")
    said = {}
    for argv in (["ingest", "--source", str(days["base"])], ["features", "build"], ["train"]):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            _cli("-c", str(config), *argv)
        said[argv[0]] = out.getvalue()
    _, _, local_built = stages["local"]
    # What the workers wrote on S3 is bit-equal; the model is `train`'s, the local one `run`'s, so only its record
    # is checked here (the engines' models are compared in tests/test_dask_engine.py).
    assert {**_built(config), "metrics": local_built["metrics"]} == local_built
    (trained,) = _metrics(config).values()
    assert 0.5 < trained["test_auc"] <= 1
    assert "version 1" in said["train"]
    assert caplog.text.count("(2 workers)") == 3  # each command's flow run had its cluster


def test_a_location_already_named_for_the_file_system_stays_on_s3(bucket, settings, tmp_path, monkeypatch):
    """`arrow_path` of its own result is the same name: `bucket/key` was taken for a path in the working
    directory, so a file meant for S3 was written there."""
    monkeypatch.chdir(tmp_path)
    remote = OfflineStore(f"s3://{bucket}/features", RawStore(f"s3://{bucket}/raw"))
    local = OfflineStore(settings.path("feature_store"), RawStore(settings.path("raw_store")))
    for store in (remote, local):
        named = store.arrow_path(store.snapshot_path(T))
        assert store.arrow_path(named) == named
    assert named == str(local.snapshot_path(T))
    named = remote.arrow_path(remote.snapshot_path(T))
    assert named.startswith(f"{bucket}/features/version=")
    frame = pd.DataFrame({"merchant_id": ["m1"], "x": [1.0]})
    remote.write(frame, named, {})
    pd.testing.assert_frame_equal(remote.read_file(named), frame)
    assert remote.fs.isfile(named) and not (tmp_path / bucket).exists()


def test_a_file_opened_through_arrow_on_s3_costs_one_metadata_request(bucket, monkeypatch):
    """Arrow reads every file of a store's scan through `arrow_filesystem`: its size and existence come from
    one lookup (a HEAD on S3). Before: Arrow's fsspec handler asked `isfile`, then the opened file its size,
    two HEADs beside each file's GET (a third of the requests of a scan of the raw store's small files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.storage import arrow_filesystem, filesystem

    fs, root = filesystem(f"s3://{bucket}/store")
    arrow = arrow_filesystem(fs)
    pq.write_table(pa.table({"x": [1, 2, 3]}), f"{root}/f.parquet", filesystem=arrow)
    lookups = []
    info, async_info = fs.info, fs._info  # the sync one runs the coroutine itself, not the attribute

    def counted(path, *args, **kwargs):
        lookups.append(path)
        return info(path, *args, **kwargs)

    async def async_counted(path, *args, **kwargs):
        lookups.append(path)
        return await async_info(path, *args, **kwargs)

    monkeypatch.setattr(fs, "info", counted)
    monkeypatch.setattr(fs, "_info", async_counted)
    fs.invalidate_cache()
    with arrow.open_input_file(f"{root}/f.parquet") as file:
        assert pq.read_table(file).column("x").to_pylist() == [1, 2, 3]
    assert lookups == [f"{root}/f.parquet"]
    for missing in (f"{root}/nothing.parquet", root):  # a missing file, a folder's name
        with pytest.raises(FileNotFoundError):
            arrow.open_input_file(missing)
