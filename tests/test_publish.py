"""Publishing: checked, immutable bundles; one atomic pointer; a failing bundle never goes live; rollback."""

from __future__ import annotations

import json

import pytest

from pipelines.config import Settings
from pipelines.errors import ScfriskError
from pipelines.files import file_sha256
from pipelines.publish import BundleCheckError, list_bundles, publish, rollback, switch_to
from serving.bundle import BUNDLES_DIR, LIMITS_FILE, MANIFEST, BundleError, check_bundle, current_bundle_id
from tests.service_fixtures import make_parts, online_snapshot, train_model


@pytest.fixture(scope="module")
def models():
    return train_model(seed=7), train_model(seed=8, rounds=25)


@pytest.fixture(scope="module")
def snapshot():
    return online_snapshot(200)


def test_publish_writes_a_hashed_bundle_and_switches_the_pointer(tmp_path, models, snapshot):
    settings = Settings(home=tmp_path / "home")
    bundle_id = publish(make_parts(tmp_path, models[0], snapshot), settings)
    published = settings.path("published")
    bundle_dir = published / BUNDLES_DIR / bundle_id
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert current_bundle_id(published) == bundle_id
    assert {"model/booster.txt", "model/pd_model.json", LIMITS_FILE, "policy.toml"} <= set(manifest["files"])
    assert all(file_sha256(bundle_dir / name) == digest for name, digest in manifest["files"].items())
    assert manifest["policy_version"] and manifest["model_version"] == "1"
    assert not list(published.glob(".staging-*")) and not (published / "CURRENT.tmp").exists()


def test_the_live_content_is_not_published_again(tmp_path, models, snapshot):
    settings = Settings(home=tmp_path / "home")
    first = publish(make_parts(tmp_path / "a", models[0], snapshot), settings)
    assert publish(make_parts(tmp_path / "b", models[0], snapshot), settings) == first
    assert list_bundles(settings.path("published")) == [first]
    other = publish(make_parts(tmp_path / "c", models[1], snapshot), settings)
    assert other != first and current_bundle_id(settings.path("published")) == other


def test_bundle_whose_limits_come_from_another_model_is_never_switched_in(tmp_path, models, snapshot):
    settings = Settings(home=tmp_path / "home")
    good = publish(make_parts(tmp_path, models[0], snapshot), settings)
    mixed = make_parts(tmp_path, models[1], snapshot, version="2")
    mixed = type(mixed)(**{**mixed.__dict__, "limits": make_parts(tmp_path, models[0], snapshot).limits})
    with pytest.raises(BundleCheckError, match="PDs differ from the bundled model"):
        publish(mixed, settings)
    published = settings.path("published")
    assert current_bundle_id(published) == good
    assert list_bundles(published) == [good]
    assert len(list((published / "rejected").iterdir())) == 1


def test_bundle_whose_reason_codes_come_from_another_model_is_never_switched_in(tmp_path, models, snapshot):
    settings = Settings(home=tmp_path / "home")
    parts = make_parts(tmp_path, models[0], snapshot)
    other = make_parts(tmp_path, models[1], snapshot, version="2").reason_codes
    mixed = type(parts)(**{**parts.__dict__, "reason_codes": other})
    with pytest.raises(BundleCheckError, match=r"reason codes of \d+ snapshot merchants .* differ from the"):
        publish(mixed, settings)
    assert current_bundle_id(settings.path("published")) is None


def test_altered_file_fails_the_hash_check_and_cannot_be_switched_back(tmp_path, models, snapshot):
    settings = Settings(home=tmp_path / "home")
    first = publish(make_parts(tmp_path, models[0], snapshot), settings)
    publish(make_parts(tmp_path, models[1], snapshot, version="2"), settings)
    (settings.path("published") / BUNDLES_DIR / first / LIMITS_FILE).write_bytes(b"tampered")
    with pytest.raises(BundleError, match=rf"hash mismatch \['{LIMITS_FILE}'\]"):
        check_bundle(settings.path("published") / BUNDLES_DIR / first, None)
    with pytest.raises(BundleError, match="hash mismatch"):
        rollback(settings)


def test_rollback_goes_to_the_previous_bundle_or_the_one_named(tmp_path, models, snapshot):
    settings = Settings(home=tmp_path / "home")
    published = settings.path("published")
    ids = [publish(make_parts(tmp_path, m, snapshot, version=str(i)), settings) for i, m in enumerate(models * 2)]
    assert list_bundles(published) == sorted(ids) == ids
    assert rollback(settings) == ids[2] and current_bundle_id(published) == ids[2]
    assert rollback(settings) == ids[1]
    assert rollback(settings, to=ids[3]) == ids[3] and current_bundle_id(published) == ids[3]
    switch_to(published, ids[0])
    with pytest.raises(ScfriskError, match="no bundle older than the live one"):
        rollback(settings)
    with pytest.raises(ScfriskError, match="no published bundle 'nope'"):
        rollback(settings, to="nope")
