"""Publishing: an immutable, checked bundle per run, made live by one atomic pointer switch.

Layout under `settings.path("published")`:
    bundles/<bundle_id>/   manifest.json (hashes of every file), manifest.sig (its HMAC when a bundle key is
                           configured, `serving.signing`) + model, features, limits, reason-code index
                           (`explanation.reason_codes` format, as saved by `ReasonCodeIndex.save`), policy, report,
                           and the day's early-warning alerts when `scfrisk monitor` published it
    rejected/<bundle_id>/  bundles that failed their checks, kept for inspection, never live
    CURRENT                the live bundle id, replaced with `os.replace` so readers see the old or the new id
The service polls CURRENT and reloads; `rollback` points it back at an older bundle. Publish, rollback and
the service pass a bundle through the same gate, `serving.bundle.check_bundle`, before it goes live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from core.errors import ScfriskError
from core.files import file_sha256
from core.settings import Settings
from explanation.reason_codes import ReasonCodeIndex
from serving import signing
from serving.bundle import (
    ALERTS_FILE,
    BUNDLES_DIR,
    FEATURES_FILE,
    LIMITS_FILE,
    MANIFEST,
    MODEL_DIR,
    POINTER,
    POLICY_FILE,
    REPORT_FILE,
    BundleCheckError,
    bundle_path,
    check_bundle,
    current_bundle_id,
    read_manifest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleParts:
    """What a run hands to publishing; tables may be in memory or already written Parquet files."""

    model_dir: Path
    model_version: str
    feature_set_version: str
    features_as_of: str
    online_features: pd.DataFrame | Path
    limits: pd.DataFrame | Path
    reason_codes: ReasonCodeIndex
    """Built in batch for the online snapshot by the same model (`ReasonCodeIndex.build`)."""
    policy_file: Path
    risk_report: Path | None = None
    alerts: pd.DataFrame | None = None
    """The early-warning alerts of `alerts_as_of` (`credit.monitoring.ALERT_COLUMNS`); the service applies
    their freezes, cuts and escalations."""
    alerts_as_of: str | None = None


def _put(source: pd.DataFrame | Path, target: Path) -> None:
    if isinstance(source, pd.DataFrame):
        source.to_parquet(target, index=False)
    else:
        shutil.copyfile(source, target)


def _stage(parts: BundleParts, staging: Path) -> dict[str, str]:
    """Copy the parts into `staging`; returns the manifest's file table (relative path -> SHA-256)."""
    shutil.copytree(parts.model_dir, staging / MODEL_DIR)
    _put(parts.online_features, staging / FEATURES_FILE)
    _put(parts.limits, staging / LIMITS_FILE)
    parts.reason_codes.save(staging)
    shutil.copyfile(parts.policy_file, staging / POLICY_FILE)
    if parts.risk_report is not None:
        shutil.copyfile(parts.risk_report, staging / REPORT_FILE)
    if parts.alerts is not None:
        _put(parts.alerts, staging / ALERTS_FILE)
    return {str(p.relative_to(staging)): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}


def build_bundle(parts: BundleParts, published: Path, key: signing.BundleKey | None,
                 now: datetime | None = None) -> Path:
    """Write a new bundle into a staging folder of `published` and return it (not yet checked or live);
    its manifest is signed when a bundle key is configured."""
    from credit.policy import load_policy

    staging = published / f".staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    files = _stage(parts, staging)
    content = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    created = (now or datetime.now(UTC)).astimezone(UTC)
    manifest = {
        "bundle_id": f"{created:%Y%m%dT%H%M%S%fZ}-{content[:8]}",
        "created_at": created.isoformat(),
        "model_version": parts.model_version,
        "feature_set_version": parts.feature_set_version,
        "features_as_of": parts.features_as_of,
        "policy_version": load_policy(parts.policy_file).version,
        **({"alerts_as_of": parts.alerts_as_of} if parts.alerts is not None else {}),
        "files": files,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if key is not None:
        signing.sign(staging, MANIFEST, key)
    return staging


def switch_to(published: Path, bundle_id: str) -> None:
    """Make `bundle_id` live: write the pointer beside the old one, then rename over it (atomic)."""
    bundle_path(published, bundle_id)
    tmp = published / f"{POINTER}.tmp"
    with tmp.open("w") as handle:
        handle.write(bundle_id + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, published / POINTER)
    log.info("bundle %s is live", bundle_id)


def publish(parts: BundleParts, settings: Settings) -> str:
    """Build, check and switch in a bundle; a bundle that fails a check is moved to `rejected/`.

    A bundle with the live one's content (same files, versions and as-of) is not published again: the
    live id stays, so the audit trail names one bundle per distinct content.
    """
    published = settings.path("published")
    key = signing.bundle_key(settings)
    staging = build_bundle(parts, published, key)
    manifest = read_manifest(staging)
    bundle_id = manifest["bundle_id"]
    live = current_bundle_id(published)
    if live is not None and _content(read_manifest(published / BUNDLES_DIR / live)) == _content(manifest):
        shutil.rmtree(staging)
        log.info("bundle content unchanged: %s stays live", live)
        return live
    try:
        check_bundle(staging, key)
    except ScfriskError as exc:
        rejected = published / "rejected" / bundle_id
        rejected.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, rejected)
        raise BundleCheckError(f"bundle {bundle_id} was not published ({rejected}): {exc}") from exc
    (published / BUNDLES_DIR).mkdir(exist_ok=True)
    os.replace(staging, published / BUNDLES_DIR / bundle_id)
    switch_to(published, bundle_id)
    return bundle_id


def _content(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key not in ("bundle_id", "created_at")}


def list_bundles(published: Path) -> list[str]:
    """Published bundle ids, oldest first (ids start with their UTC creation time)."""
    root = published / BUNDLES_DIR
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def rollback(settings: Settings, to: str | None = None) -> str:
    """Switch to bundle `to`, or to the newest bundle older than the live one; it is re-checked first."""
    published = settings.path("published")
    bundles = list_bundles(published)
    live = current_bundle_id(published)
    if to is None:
        older = [b for b in bundles if live is None or b < live]
        if not older:
            raise ScfriskError(f"no bundle older than the live one ({live}) to roll back to in {published}")
        to = older[-1]
    check_bundle(bundle_path(published, to), signing.bundle_key(settings))
    switch_to(published, to)
    return to
