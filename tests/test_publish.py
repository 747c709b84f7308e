"""Publishing: checked, immutable bundles; one atomic pointer; a failing bundle never goes live; rollback."""

from __future__ import annotations

import json
import logging
import secrets

import pytest

from core.errors import ScfriskError
from core.files import file_sha256
from core.settings import ConfigError, Settings
from pipelines.publish import BundleCheckError, list_bundles, publish, rollback, switch_to
from serving.bundle import (
    BUNDLES_DIR,
    LIMITS_FILE,
    MANIFEST,
    BundleError,
    bundle_path,
    check_bundle,
    current_bundle_id,
    replay_decisions,
)
from serving.signing import KEY_ENV, SIGNATURE, SignatureError, bundle_key
from testkit.service import (
    drop_last_merchants_limit,
    make_parts,
    online_snapshot,
    tamper_limits,
    train_model,
)


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


def test_bundle_that_cannot_be_decided_is_refused_by_publish_and_rollback(tmp_path, models, snapshot):
    """A limit table edited with its hash recomputed: before, it passed the checks and answered 500."""
    settings = Settings(home=tmp_path / "home")
    published = settings.path("published")
    parts = make_parts(tmp_path, models[0], snapshot)
    broken = parts.limits.copy()
    drop_last_merchants_limit(broken)
    with pytest.raises(BundleCheckError, match=r"rows of 1 snapshot merchants .* differ"):
        publish(type(parts)(**{**parts.__dict__, "limits": broken}), settings)
    first = publish(parts, settings)
    second = publish(make_parts(tmp_path, models[1], snapshot, version="2"), settings)
    tamper_limits(published / BUNDLES_DIR / first, drop_last_merchants_limit)
    with pytest.raises(BundleCheckError, match="differ"):
        rollback(settings)
    assert current_bundle_id(published) == second


def test_ids_leading_out_of_the_bundles_folder_are_refused(tmp_path, models, snapshot):
    settings, elsewhere = Settings(home=tmp_path / "home"), Settings(home=tmp_path / "elsewhere")
    publish(make_parts(tmp_path, models[0], snapshot), settings)
    outside = publish(make_parts(tmp_path, models[1], snapshot, version="2"), elsewhere)
    published = settings.path("published")
    (published / BUNDLES_DIR / "link").symlink_to(elsewhere.path("published") / BUNDLES_DIR / outside)
    for bundle_id in (f"../../../elsewhere/published/bundles/{outside}",
                      str(elsewhere.path("published") / BUNDLES_DIR / outside), "link", "..", "."):
        with pytest.raises(BundleError, match="no published bundle"):
            rollback(settings, to=bundle_id)
        with pytest.raises(BundleError, match="no published bundle"):
            switch_to(published, bundle_id)
        with pytest.raises(BundleError, match="no published bundle"):
            bundle_path(published, bundle_id)


def _key_file(folder, text: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bundle.key"
    path.write_text(text or secrets.token_hex(32))
    return path


def test_signed_manifests_cannot_be_changed_without_the_key(tmp_path, models, snapshot, caplog):
    signed = Settings(home=tmp_path / "home", bundle_key_file=_key_file(tmp_path / "secrets"))
    unsigned = Settings(home=tmp_path / "home")
    published = signed.path("published")
    with caplog.at_level(logging.WARNING, logger="serving.bundle"):
        old = publish(make_parts(tmp_path, models[0], snapshot, version="0"), unsigned)
    assert "no bundle key is configured" in caplog.text and not (published / BUNDLES_DIR / old / SIGNATURE).exists()
    first = publish(make_parts(tmp_path, models[0], snapshot), signed)
    second = publish(make_parts(tmp_path, models[1], snapshot, version="2"), signed)
    assert (published / BUNDLES_DIR / first / SIGNATURE).is_file()
    check_bundle(published / BUNDLES_DIR / first, bundle_key(signed))

    with pytest.raises(SignatureError, match=f"bundle {old} is not signed"):
        rollback(signed, to=old)
    other = Settings(home=tmp_path / "home", bundle_key_file=_key_file(tmp_path / "other"))
    with pytest.raises(SignatureError, match="not with the configured key"):
        rollback(other, to=first)
    manifest = json.loads((published / BUNDLES_DIR / first / MANIFEST).read_text())
    manifest["features_as_of"] = "2030-01-01T00:00:00"  # scores as before: only the signature can tell
    (published / BUNDLES_DIR / first / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(SignatureError, match="manifest was changed after it was signed"):
        rollback(signed)
    assert current_bundle_id(published) == second
    # An auditor's replay opens the bundle a line names the same way: what was changed after signing is refused.
    line = {"bundle_id": first, "request_id": "r1", "merchant_id": snapshot["merchant_id"].iloc[0]}
    with pytest.raises(SignatureError, match="manifest was changed after it was signed"):
        next(replay_decisions([line], published, bundle_key(signed)))


def test_the_bundle_key_comes_from_outside_the_workspace(tmp_path, monkeypatch):
    home = tmp_path / "home"
    with pytest.raises(ConfigError, match="inside"):
        bundle_key(Settings(home=home, bundle_key_file=_key_file(home / "keys")))
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        bundle_key(Settings(home=home, bundle_key_file=_key_file(tmp_path / "short", "tiny")))
    with pytest.raises(ConfigError, match="absolute path"):
        bundle_key(Settings(home=home, bundle_key_file="bundle.key"))
    from_file = bundle_key(Settings(home=home, bundle_key_file=_key_file(tmp_path / "k")))
    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))
    from_env = bundle_key(Settings(home=home, bundle_key_file=tmp_path / "k" / "bundle.key"))
    assert from_file.key_id != from_env.key_id and bundle_key(Settings(home=home)) == from_env
    monkeypatch.delenv(KEY_ENV)
    assert bundle_key(Settings(home=home)) is None
