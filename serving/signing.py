"""HMAC signatures of bundle manifests, so that write access to the published folder is not enough to
change decisions.

The manifest lists the SHA-256 of every bundle file, so its HMAC covers the whole bundle. Anyone who can
write `published/` can recompute those hashes, but not the HMAC without the key, which is kept outside
the workspace: in `SCFRISK_BUNDLE_KEY`, or in the file `bundle_key_file` names (an absolute path outside
SCFRISK_HOME and the published folder). Without a key, bundles are neither signed nor verified and a
warning says so; with one, a bundle whose signature is missing or wrong never goes live.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import ScfriskError
from core.settings import ConfigError, Settings

KEY_ENV = "SCFRISK_BUNDLE_KEY"
SIGNATURE = "manifest.sig"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 32


class SignatureError(ScfriskError):
    """A bundle's manifest signature is missing or does not verify with the configured key."""


@dataclass(frozen=True)
class BundleKey:
    secret: bytes
    key_id: str
    """Names the key in signatures and errors (a digest prefix; never the key)."""

    @classmethod
    def of(cls, secret: bytes, source: str) -> BundleKey:
        if len(secret) < MIN_KEY_BYTES:
            raise ConfigError(f"the bundle key from {source} is shorter than {MIN_KEY_BYTES} bytes; use a random key")
        return cls(secret, "bk-" + hashlib.sha256(b"scfrisk-bundle-key:" + secret).hexdigest()[:10])

    def mac(self, manifest: bytes) -> str:
        return hmac.new(self.secret, manifest, hashlib.sha256).hexdigest()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def bundle_key(settings: Settings, environ: Mapping[str, str] = os.environ) -> BundleKey | None:
    """The configured key (`SCFRISK_BUNDLE_KEY` first, then `bundle_key_file`), or None when neither is set."""
    if environ.get(KEY_ENV):
        return BundleKey.of(environ[KEY_ENV].strip().encode(), KEY_ENV)
    if settings.bundle_key_file is None:
        return None
    path = settings.bundle_key_file
    if not path.is_absolute():
        raise ConfigError(f"bundle_key_file '{path}' must be an absolute path outside the workspace")
    resolved = path.resolve()
    for folder in (settings.home_dir, settings.path("published").resolve()):
        if _inside(resolved, folder):
            raise ConfigError(f"bundle_key_file {path} is inside {folder}: whoever can write there could replace "
                              "the key; keep it outside the workspace")
    try:
        secret = resolved.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read bundle_key_file {path}: {exc.strerror}") from exc
    return BundleKey.of(secret, f"bundle_key_file {path}")


def sign(bundle_dir: Path, manifest_name: str, key: BundleKey) -> None:
    """Write the signature of the bundle's manifest beside it."""
    body = {"algorithm": ALGORITHM, "key_id": key.key_id, "mac": key.mac((bundle_dir / manifest_name).read_bytes())}
    (bundle_dir / SIGNATURE).write_text(json.dumps(body) + "\n")


def verify(bundle_dir: Path, manifest_name: str, key: BundleKey) -> None:
    """Raise `SignatureError` unless the manifest carries a valid signature made with `key`."""
    path = bundle_dir / SIGNATURE
    if not path.is_file():
        raise SignatureError(f"bundle {bundle_dir.name} is not signed ({SIGNATURE} missing) and a bundle key "
                             f"({key.key_id}) is configured")
    try:
        body = json.loads(path.read_text())
        algorithm, key_id, mac = body["algorithm"], body["key_id"], body["mac"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"bundle {bundle_dir.name} has an unreadable {SIGNATURE}") from exc
    if algorithm != ALGORITHM or key_id != key.key_id:
        raise SignatureError(f"bundle {bundle_dir.name} is signed with {algorithm} key {key_id}, not with the "
                             f"configured key {key.key_id}")
    if not hmac.compare_digest(str(mac), key.mac((bundle_dir / manifest_name).read_bytes())):
        raise SignatureError(f"the signature of bundle {bundle_dir.name} does not match its {manifest_name}: the "
                             "manifest was changed after it was signed")
