"""API keys with scopes: `key` grants every scope, `key:score+read` only those listed.

Only SHA-256 digests of the keys are kept, compared in constant time; callers are named in logs by a
key id derived from the digest, never by the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from core.errors import ScfriskError

SCOPES = ("score", "read")
"""`score`: POST /v1/score and /v1/score/batch; `read`: limits, model and report lookups."""
KEYS_ENV = "SCFRISK_API_KEYS"
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    digest: bytes
    scopes: frozenset[str]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key(spec: str, position: str) -> ApiKey:
    """One `key[:scope+scope]` entry; `position` names where it came from (never the key) in errors."""
    key, _, scope_text = spec.strip().partition(":")
    if len(key) < MIN_KEY_LENGTH:
        raise ScfriskError(f"API key {position} is shorter than {MIN_KEY_LENGTH} characters; use a random key")
    scopes = frozenset(scope_text.split("+")) if scope_text else frozenset(SCOPES)
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ScfriskError(f"API key {position} has unknown scope(s) {unknown}; known scopes: {list(SCOPES)}")
    digest = _digest(key)
    return ApiKey(key_id=f"key-{digest.hex()[:10]}", digest=digest, scopes=scopes)


class Keyring:
    """The keys a service accepts."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)

    @classmethod
    def from_config(cls, configured: Iterable[str], environ: Mapping[str, str]) -> Keyring:
        """Keys of `[service].api_keys` plus the comma-separated `SCFRISK_API_KEYS` variable."""
        entries = [(spec, f"#{i + 1} of [service].api_keys") for i, spec in enumerate(configured)]
        from_env = [s for s in environ.get(KEYS_ENV, "").split(",") if s.strip()]
        entries += [(spec, f"#{i + 1} of {KEYS_ENV}") for i, spec in enumerate(from_env)]
        return cls(parse_key(spec, position) for spec, position in entries)

    def identify(self, presented: str | None) -> ApiKey | None:
        """The matching key, or None; every stored digest is compared so timing says nothing."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found
