"""Offline snapshots, online lookup, the generated catalogue, the CLI and the Prefect build flow."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from features.catalogue import CATALOGUE, render_catalogue
from features.definitions import feature_names
from features.offline_store import OfflineStore, read_metadata
from features.online_store import ONLINE_FILE, publish_online
from pipelines.cli import app
from pipelines.features import build_features_flow
from tests.rawdata import write_raw_store
from tests.test_features import TABLES, T


@pytest.fixture
def offline(settings):
    store = write_raw_store(settings.path("raw_store"), TABLES)
    return OfflineStore(settings.path("feature_store"), store)


def _as_python(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _online(root) -> tuple[dict[str, dict], pd.Timestamp]:
    """The published online vectors by merchant, and their as_of."""
    path = root / ONLINE_FILE
    rows = pd.read_parquet(path).set_index("merchant_id")[feature_names()]
    vectors = {m: {n: _as_python(v) for n, v in row.items()} for m, row in rows.iterrows()}
    return vectors, pd.Timestamp(read_metadata(path)["as_of"])


def test_online_vectors_equal_the_offline_snapshot(offline):
    publish_online(offline, T)
    online, as_of = _online(offline.root)
    snapshot = offline.read(T)
    assert len(online) == len(snapshot) == 3 and as_of == T
    for _, row in snapshot.iterrows():
        assert online[row["merchant_id"]] == {n: _as_python(row[n]) for n in feature_names()}
    assert online["M1"]["net_sales_30d"] == 300.0


def test_snapshot_reused_until_raw_data_changes(offline):
    path = offline.materialize(T)
    meta = read_metadata(path)
    assert meta["raw_snapshot_id"] == offline.raw_store.snapshot_id
    assert meta["feature_set_version"] == offline.version
    os.utime(path, (0, 0))
    assert offline.materialize(T).stat().st_mtime == 0  # reused
    changed = {**TABLES, "orders": TABLES["orders"][:1]}
    write_raw_store(offline.raw_store.root, changed)
    assert offline.materialize(T).stat().st_mtime > 0  # new snapshot_id: recomputed
    assert offline.read(T).set_index("merchant_id").loc["M1", "gmv_90d"] == 100.0


def test_merchants_onboarded_after_as_of_are_not_in_the_snapshot(offline):
    assert sorted(offline.read(T)["merchant_id"]) == ["M1", "M2", "M3"]
    assert sorted(offline.read(pd.Timestamp("2023-06-01"))["merchant_id"]) == ["M1", "M3"]


def test_catalogue_is_generated_and_up_to_date():
    text = render_catalogue()
    for name in feature_names():
        assert f"| `{name}` |" in text
    assert CATALOGUE.read_text() == text, "regenerate it: make docs"


def test_cli_training_set_from_csv(offline, settings, tmp_path, monkeypatch):
    monkeypatch.setenv("SCFRISK_HOME", str(settings.home_dir))
    entities = tmp_path / "entities.csv"
    pd.DataFrame({"merchant_id": ["M1", "M2"], "as_of": [T, T], "application_id": [2, 9]}).to_csv(entities, index=False)
    out = tmp_path / "train.parquet"
    result = CliRunner().invoke(app, ["features", "training-set", "--entities", str(entities), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert list(frame["application_id"]) == [2, 9]
    assert frame.loc[0, "net_sales_30d"] == 300.0


def test_build_flow_then_rerun_reuses_everything(offline, settings, prefect_server):
    first = build_features_flow(settings=settings)
    assert first.online_as_of == pd.Timestamp("2024-08-01")  # month after the last order
    training = pd.read_parquet(first.training_set)
    assert list(training["application_id"]) == [3, 1]
    tenure = training.set_index("application_id").loc[1, "tenure_days"]
    assert tenure == pytest.approx((T - pd.Timestamp("2023-01-01")).days - 200)
    assert _online(offline.root)[0]["M1"]["gmv_90d"] == 1420.0  # includes the order at T
    stamps = {p: p.stat().st_mtime_ns for p in [first.training_set, *first.snapshots]}
    second = build_features_flow(settings=settings)
    assert {p: p.stat().st_mtime_ns for p in [second.training_set, *second.snapshots]} == stamps


def test_cli_materialize_publishes_online_vectors(offline, settings, monkeypatch):
    monkeypatch.setenv("SCFRISK_HOME", str(settings.home_dir))
    result = CliRunner().invoke(app, ["features", "materialize", "--as-of", "2024-07-01"])
    assert result.exit_code == 0, result.output
    online, as_of = _online(settings.path("feature_store"))
    assert as_of == T and online["M1"]["net_sales_30d"] == 300.0
