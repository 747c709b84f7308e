"""Stores addressed by URL from the settings: `[paths] raw_store` and `feature_store` on a local S3-compatible
server (moto's, `testkit.s3`) and as `file://` URLs give what local folders give, bit for bit."""

from __future__ import annotations

import importlib.util
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
from tests.conftest import SAMPLE
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
        settings = load_settings(config)
        offline = OfflineStore.from_settings(settings)
        training = offline.location(f"version={offline.version}",
                                    f"training_set_h{settings.model.label_horizon_months}.parquet")
        out[name] = {
            "snapshot": offline.raw_store.snapshot_id,
            "training": offline.fs.cat_file(fsspec.core.strip_protocol(str(training))),
            "online": offline.fs.cat_file(fsspec.core.strip_protocol(str(offline.location(*ONLINE_FILE.parts)))),
            "files": sorted(Path(p).name for p in offline.snapshot_files(offline.version)),
            "rows": len(offline.read_file(training)),
        }
    capsys.readouterr()
    assert out["local"]["snapshot"] is not None and out["local"]["rows"] > 0 and out["local"]["files"]
    assert out["s3"] == out["local"] and out["file"] == out["local"]
    assert RawStore.from_settings(load_settings(tmp_path / "s3" / "scfrisk.toml")).url == f"s3://{bucket}/raw"
    assert not (tmp_path / "s3" / "raw").exists() and not (tmp_path / "s3" / "features").exists()
    assert not (tmp_path / "file" / "raw").exists() and (tmp_path / "lake" / "raw" / "_manifest.json").is_file()
