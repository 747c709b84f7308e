"""`scfrisk vacuum`: after several refreshed days the old files go, and whatever is still needed stays
(the latest raw snapshot, a model's training snapshot, the live bundle, the bundle a logged decision was
made with); a second vacuum removes nothing; a dry run removes nothing. Real Delta store, real MLflow
registry, a real service writing the audit log."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import ConfigError, Settings, load_settings
from pipelines.refresh import refresh
from pipelines.retention import vacuum
from testkit.daily import split_day
from tests.batch_builder import valid_batch
from tests.test_raw_store import load, order_ids

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "platform"
DAY = pd.Timestamp("2025-10-15")
KEY = "retention-test-key-0123456789"
LATER = datetime.now(UTC) + timedelta(days=45)
"""A vacuum 45 days on: everything the test wrote is older than the default 30 days' window."""


@dataclass
class Workspace:
    settings: Settings
    trained_on: str
    """The raw snapshot the registered champion records (its training data)."""
    decided_with: str
    """The bundle a logged decision was made with (since superseded)."""
    next_day: Path


def _files(home: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*") if p.is_file()}


def _tables(store: RawStore) -> dict[str, pa.Table]:
    return {name: store.dataset(name).to_table() for name in store.manifest()["tables"]}


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """A champion trained on the base's snapshot, a decision served from the base's bundle, then three
    refreshed days (the fourth day's pull kept for later)."""
    from mlflow import MlflowClient

    from serving.app import create_app
    from serving.auth import Keyring
    from testkit.service import register_champion, running_service

    root = tmp_path_factory.mktemp("retention")
    pulls = []
    for k in range(4):
        split_day(SAMPLE, DAY + pd.Timedelta(days=k), root / f"base{k}", root / f"day{k}", merchants=300)
        pulls.append(root / f"day{k}")
    settings = Settings(home=root / "home")
    version = register_champion(settings)
    first = refresh(settings, root / "base0")
    client = MlflowClient(settings.tracking_uri)
    client.set_tag(client.get_model_version(settings.mlflow.registered_model, version).run_id, "raw_snapshot_id",
                   first.snapshot_id)  # what `scfrisk train` records of the data it trained on
    merchant = pd.read_parquet(settings.path("feature_store") / "online" / "features.parquet")["merchant_id"].iloc[0]
    with running_service(create_app(settings, Keyring.from_config([], {"SCFRISK_API_KEYS": KEY})), KEY) as service:
        answer = service.post("/v1/score", json={"merchant_id": merchant})
        assert answer.status_code == 200 and answer.json()["bundle_id"] == first.bundle_id
    for pull in pulls[:3]:
        refresh(settings, pull)
    return Workspace(settings, first.snapshot_id, first.bundle_id, pulls[3])


@pytest.mark.slow
def test_vacuum_removes_old_files_and_keeps_what_is_needed(workspace):
    from serving.audit import read_audit
    from serving.bundle import BUNDLES_DIR, current_bundle_id, replay_decisions

    settings = workspace.settings
    home, published = settings.home_dir, settings.path("published")
    store = RawStore.from_settings(settings)
    latest = store.snapshot_id
    snapshots = list(store.snapshots())
    assert len(snapshots) == 4 and workspace.trained_on in snapshots and latest != workspace.trained_on
    before = {s: _tables(store.at(s)) for s in (latest, workspace.trained_on)}
    live = current_bundle_id(published)
    live_hash = _tree_hash(published / BUNDLES_DIR / live)
    files = _files(home)

    # Within the window (30 days by default) nothing goes, and a dry run removes nothing whatever it lists.
    assert vacuum(settings).removed == []
    dry = vacuum(settings, dry_run=True, now=LATER)
    assert dry.removed and _files(home) == files
    assert f"would remove {len(dry.removed)}" in dry.describe() and dry.removed[0].path in dry.describe()

    done = vacuum(settings, now=LATER)
    assert [r.path for r in done.removed] == [r.path for r in dry.removed]
    after = _files(home)
    assert sum(size for size, _ in after.values()) == sum(size for size, _ in files.values()) - done.bytes
    kinds = {r.kind for r in done.removed}
    assert {"raw store", "feature snapshots", "published bundles", "limits", "early-warning alerts"} <= kinds

    # The latest snapshot and the model's read back the same; the others are refused by name.
    store = RawStore.from_settings(settings)
    assert set(done.snapshots_kept) == {latest, workspace.trained_on} == set(store.snapshots())
    for snapshot, tables in before.items():
        again = store.at(snapshot)
        assert again.snapshot_id == snapshot
        assert {n: t.equals(tables[n]) for n, t in _tables(again).items()} == dict.fromkeys(tables, True)
    dropped = (set(snapshots) - {latest, workspace.trained_on}).pop()
    with pytest.raises(ScfriskError, match=f"has no snapshot {dropped}"):
        store.at(dropped)

    # The live bundle is untouched; the bundle of the logged decision is kept and replays it.
    assert current_bundle_id(published) == live and _tree_hash(published / BUNDLES_DIR / live) == live_hash
    records = read_audit(settings.audit_log)
    assert {r["bundle_id"] for r in records} == {workspace.decided_with}
    for record, replayed in replay_decisions(records, published, None):
        assert replayed == {"pd": record["pd"], "grade": record["grade"], "decision": record["decision"]}

    again = vacuum(settings, now=LATER)
    assert again.removed == [] and again.snapshots_dropped == []
    assert _files(home) == after

    # The next day rolls forward from the snapshot the daily features were last built on: no full rebuild.
    assert "first build" not in refresh(settings, workspace.next_day).features


def test_a_retention_setting_of_the_wrong_type_is_one_clear_error(tmp_path):
    config = tmp_path / "scfrisk.toml"
    for value, why in (('"thirty"', "valid integer"), ("0", "greater than or equal to 1")):
        config.write_text(f"[retention]\ndays = {value}\n")
        with pytest.raises(ConfigError, match=rf"retention\.days.*{why}") as error:
            load_settings(config)
        assert len(str(error.value).splitlines()) == 1


def _store_with_days(root: str, days: int) -> tuple[RawStore, list[str]]:
    """A store loaded with the test batch, then `days` daily batches of orders; every snapshot, oldest first."""
    store = RawStore(root)
    load(store, valid_batch())
    for day in range(days):
        orders = valid_batch()["orders"]
        orders["order_id"] += 100 * (day + 1)
        load(store, {"orders": orders})
    return store, list(store.snapshots())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_raw_store_vacuum_keeps_the_protected_snapshot_on_any_store(where, tmp_path, request):
    root = str(tmp_path / "raw") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/raw"
    store, snapshots = _store_with_days(root, 3)
    first = snapshots[0]
    expected = order_ids(store.at(first))
    files = store.fs.find(root)
    result = store.vacuum({first}, datetime.now(UTC) + timedelta(days=1))
    assert result.kept == [first, snapshots[-1]] and result.dropped == snapshots[1:-1]
    assert result.files and not set(result.files) & set(store.fs.find(root)) and set(result.files) <= set(files)
    assert order_ids(store.at(first)) == expected and len(order_ids(store)) == 24
    assert store.vacuum({first}, datetime.now(UTC) + timedelta(days=1)).files == {}


def test_the_snapshot_current_at_the_cutoff_stays(tmp_path):
    """Time travel to any moment of the window: the snapshot that was current at its start is kept too."""
    store, snapshots = _store_with_days(str(tmp_path / "raw"), 2)
    records = tmp_path / "raw" / "_snapshots"
    for age, snapshot in zip((40, 35, 1), snapshots, strict=True):  # committed 40, 35 and 1 day(s) ago
        stamp = time.time() - age * 86400
        os.utime(records / f"{snapshot}.json", (stamp, stamp))
    result = store.vacuum(set(), datetime.now(UTC) - timedelta(days=30), dry_run=True)
    assert result.kept == snapshots[1:] and result.dropped == snapshots[:1]


def test_a_months_old_snapshot_stays_loadable_after_delta_checkpoints(tmp_path):
    """Delta removes commit files older than `delta.logRetentionDuration` when it writes a checkpoint; then
    the versions before the checkpoint cannot be loaded. The store's commits keep the log whole."""
    store, snapshots = _store_with_days(str(tmp_path / "raw"), 0)
    first = store.snapshot_id
    # As if a year of daily batches had gone by: a checkpoint every other commit, the log's retention expired.
    DeltaTable(store.table_url("orders")).alter.set_table_properties(
        {"delta.checkpointInterval": "2", "delta.logRetentionDuration": "interval 0 seconds"})
    time.sleep(0.01)
    for day in range(4):
        orders = valid_batch()["orders"]
        orders["order_id"] += 100 * (day + 1)
        load(store, {"orders": orders})
    assert len(list((tmp_path / "raw" / "orders" / "_delta_log").glob("*.checkpoint.parquet"))) >= 2
    assert order_ids(store.at(first)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_scfrisk_vacuum_dry_run_lists_and_removes_nothing(workspace, tmp_path, prefect_server, monkeypatch):
    from typer.testing import CliRunner

    from pipelines.cli import app

    home = tmp_path / "home"
    shutil.copytree(workspace.settings.home_dir, home)  # copy2: the files keep their times
    stamp = time.time() - 40 * 86400
    for path in home.rglob("*"):
        os.utime(path, (stamp, stamp))  # 40 days on
    monkeypatch.setenv("SCFRISK_HOME", str(home))
    files = _files(home)
    result = CliRunner().invoke(app, ["vacuum", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would remove" in result.output and f"{home}/raw/orders/" in result.output
    assert _files(home) == files


@pytest.mark.parametrize("where", ["local", "s3"])
def test_feature_snapshots_keep_the_newest_and_the_reports_months_on_any_store(where, tmp_path, request):
    from core.settings import FeaturesConfig, PathsConfig
    from features.offline_store import OfflineStore
    from pipelines.retention import feature_snapshots

    store = "features" if where == "local" else f"s3://{request.getfixturevalue('bucket')}/features"
    settings = Settings(home=tmp_path / "home", paths=PathsConfig(feature_store=store),
                        features=FeaturesConfig(snapshot_months=1))
    offline = OfflineStore.from_settings(settings)
    days = ["2025-09-01", "2025-10-01", "2025-10-14", "2025-10-15"]
    for day in days:
        offline.write(pd.DataFrame({"merchant_id": ["M1"]}), offline.snapshot_path(pd.Timestamp(day)), {})
    old = feature_snapshots(settings, datetime.now(UTC) + timedelta(days=1))
    assert [r.path.rsplit("/", 1)[1] for r in old] == ["as_of=2025-09-01T000000.parquet",
                                                       "as_of=2025-10-14T000000.parquet"]
    assert all(r.bytes > 0 for r in old)
    assert feature_snapshots(settings, datetime.now(UTC) - timedelta(days=1)) == []  # all within the window


def test_the_bundles_of_logged_decisions_are_read_from_rotated_logs_too(tmp_path, monkeypatch):
    import gzip

    import pipelines.retention
    from pipelines.retention import decision_bundles

    log = tmp_path / "audit" / "decisions.jsonl"
    log.parent.mkdir()
    log.write_text('{"bundle_id":"b-3","pd":0.1}\n{"bundle_id": "b-4"}\n')
    (tmp_path / "audit" / "decisions.jsonl.1").write_text('{"bundle_id":"b-2"}\n')
    (tmp_path / "audit" / "decisions.jsonl.2.gz").write_bytes(gzip.compress(b'{"bundle_id":"b-1"}\n'))
    monkeypatch.setattr(pipelines.retention, "AUDIT_BLOCK", 8)  # lines cut across blocks
    assert decision_bundles(log) == {"b-1", "b-2", "b-3", "b-4"}
    assert decision_bundles(tmp_path / "none" / "decisions.jsonl") == set()
