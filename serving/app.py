"""The scoring service the loan engine calls: the app factory wires settings, keys, the live bundle, the
audit log, the body guard and the routers (`serving.routes`); each route reads alone.
"""

from __future__ import annotations

import asyncio
import copy
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from core.errors import ScfriskError
from core.settings import Settings
from serving.audit import AuditLog, DurableAnswers
from serving.auth import Keyring
from serving.live import LiveBundle
from serving.problems import invalid_request
from serving.routes import lookup, operations, scoring
from serving.signing import bundle_key


class BodyLimit:
    """Pure ASGI guard: refuse bodies over `max_bytes` before they are read whole (413)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": f"request body exceeds {self.max_bytes} bytes"}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


SWITCH_INTERVAL_SECONDS = 0.0005
"""How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). Loading a new
bundle is pure Python for seconds (about 15 s of CPU at 39,000 merchants), in a thread beside the requests;
at the default a request waits up to 5 ms for the GIL at each of its steps. Measured at 10M orders, 50
requests a second, during the switch: p50 2.2 s before (with the collector's pauses, see `serving.live`),
100 to 300 ms without those, under 20 ms in most seconds with this interval (one run each, load 3 to 4)."""


def create_app(settings: Settings, keyring: Keyring) -> FastAPI:
    """The service for one workspace; refuses to build without an API key."""
    if not keyring.keys:
        raise ScfriskError(
            "no API key configured: set SCFRISK_API_KEYS (comma separated, 'key' or 'key:score+read') "
            "or [service].api_keys"
        )
    service = settings.service
    live = LiveBundle(settings.path("published"), bundle_key(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        audit = AuditLog(settings.audit_log)
        app.state.audit = audit
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        await live.refresh()

        async def watch() -> None:
            while True:
                await asyncio.sleep(service.reload_interval_seconds)
                await live.refresh()

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
            audit.close()

    app = FastAPIOffline(
        title="scfrisk scoring service",
        version="1",
        description=(
            "PD, grade, limits per product, decision and reason codes for platform merchants. An explicit "
            "`features` payload carries every input of the live model (GET /v1/model), `null` when unknown; at "
            f"most {service.max_missing_share:.0%} of the model's inputs may be unknown (`[service]."
            "max_missing_share`), and non-finite numbers, wrong types and unknown keys are refused with 422 "
            "naming the field."
        ),
        lifespan=lifespan,
    )
    app.state.settings, app.state.keyring, app.state.live = settings, keyring, live
    app.add_middleware(BodyLimit, max_bytes=service.max_request_bytes)
    app.add_middleware(DurableAnswers)
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    for router in (scoring.router, lookup.router, operations.router):
        app.include_router(router)
    app.openapi = _openapi_with_live_values(app, live)  # type: ignore[method-assign]
    return app


def _openapi_with_live_values(app: FastAPI, live: LiveBundle) -> Any:
    """The OpenAPI schema, with the live policy's products and grades as the values they may take."""
    static_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = copy.deepcopy(static_openapi())
        components = schema["components"]["schemas"]
        # batch items are validated one by one in the handler; pydantic documents them inline, point them at
        # the one ScoreRequest schema instead
        components["BatchRequest"]["properties"]["requests"]["items"] = {"$ref": "#/components/schemas/ScoreRequest"}
        bundle = live.bundle
        if bundle is not None:
            products = list(bundle.policy.products)
            grades = [grade.grade for grade in bundle.policy.master_scale.grades]
            for model, name, values in (("ScoreRequest", "product", products), ("ProductLimit", "product", products),
                                        ("ScoreResponse", "grade", grades), ("MerchantLimits", "grade", grades)):
                field = components[model]["properties"][name]
                text = next((s for s in field.get("anyOf", []) if s.get("type") == "string"), field)
                text["enum"] = values
        return schema

    return openapi
