"""What routes ask FastAPI for: the caller's API key with a scope, the live bundle, the settings.

Everything comes from the app's state, set once by `create_app`, so a route is a plain module-level
function that reads alone.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from core.settings import Settings
from serving.audit import AuditLog
from serving.auth import ApiKey
from serving.bundle import Bundle
from serving.live import LiveBundle

key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key with the needed scope.")


def caller_with(scope: str, request: Request, key: str | None) -> ApiKey:
    """The caller the key identifies, refused with 401 (no or unknown key) or 403 (scope missing)."""
    found = request.app.state.keyring.identify(key)
    if found is None:
        raise HTTPException(401, "missing or unknown API key in the X-API-Key header")
    if scope not in found.scopes:
        raise HTTPException(403, f"API key {found.key_id} lacks the '{scope}' scope")
    return found


def scope(name: str) -> Callable[..., ApiKey]:
    """A dependency that admits callers whose key has scope `name`."""

    def check(request: Request, key: str | None = Security(key_header)) -> ApiKey:
        return caller_with(name, request, key)

    return check


def live(request: Request) -> LiveBundle:
    return request.app.state.live


def bundle(request: Request) -> Bundle:
    """The bundle this request answers from, taken once (503 when none is live)."""
    return request.app.state.live.require()


def settings(request: Request) -> Settings:
    return request.app.state.settings


def audit(request: Request) -> AuditLog:
    return request.app.state.audit
