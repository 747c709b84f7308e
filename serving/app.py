"""The scoring service the loan engine calls: FastAPI app factory over the live published bundle.

A request takes the bundle reference once and keeps it to the end, so a reload (load the new bundle
fully, then swap one reference) never changes the answer of a request in flight. A bundle that cannot
be loaded is not swapped in: the old one keeps serving and `/readyz` says so.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError

from pipelines.config import Settings
from pipelines.errors import ScfriskError
from serving.audit import AuditLog, DurableAnswers
from serving.auth import ApiKey, Keyring
from serving.bundle import (
    BUNDLES_DIR,
    MANIFEST,
    POINTER,
    REPORT_FILE,
    Bundle,
    BundleError,
    Scored,
    bundle_path,
    check_bundle,
    current_bundle_id,
    read_manifest,
)
from serving.schemas import (
    MAX_TEXT,
    BatchRequest,
    BatchResponse,
    Health,
    MerchantLimits,
    ModelInfo,
    Problem,
    Readiness,
    ScoreRequest,
    ScoreResponse,
)
from serving.signing import BundleKey, bundle_key

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No or unknown API key in X-API-Key."},
    403: {"model": Problem, "description": "The API key lacks the scope this endpoint needs."},
    413: {"model": Problem, "description": "Request body or batch larger than the configured maximum."},
    503: {"model": Problem, "description": "No bundle published or loaded yet."},
}
NOT_FOUND = {404: {"model": Problem, "description": "Unknown merchant, report or bundle."}}
UNREADABLE = {400: {"model": Problem, "description": "The body cannot be parsed (not UTF-8, or nested too deep)."}}
MAX_PROBLEMS = 20
"""Errors listed in one 422 body (or one batch item's detail); the rest are counted."""


class LiveBundle:
    """The one reference requests read; replaced whole by `refresh`, never mutated.

    A bundle that fails to load is tried again as soon as the pointer or any of its files change (a
    repair), not on every poll: a load re-scores part of the bundle, and a broken one would do that, and
    log, every few seconds. Each distinct failure is logged once.
    """

    def __init__(self, published: Path, key: BundleKey | None) -> None:
        self.published = published
        self.key = key
        self.bundle: Bundle | None = None
        self.failed: tuple[str, str] | None = None
        """(bundle id, error) of the last bundle that could not be loaded."""
        self._tried: tuple[Any, ...] | None = None
        """What the pointer and the bundle's files were when that load failed."""

    def require(self) -> Bundle:
        bundle = self.bundle
        if bundle is None:
            if self.failed:
                raise HTTPException(503, f"no bundle is live: published bundle {self.failed[0]} cannot be served: "
                                         f"{self.failed[1]}")
            raise HTTPException(503, "no bundle is published yet: run the pipeline's publish step")
        return bundle

    def _state(self, target: str) -> tuple[Any, ...]:
        """The pointer's target and the identity, size and times of every file of that bundle."""
        try:
            folder = bundle_path(self.published, target)
        except BundleError:
            return (target,)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return (target, *((str(p), s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                          for p, s in ((p, p.stat()) for p in files)))

    async def refresh(self) -> None:
        """Load the bundle the pointer names if it is new or was repaired; on any failure keep the current
        one (this runs in the service's watcher task, which must outlive every error)."""
        try:
            target = current_bundle_id(self.published)
        except OSError as exc:
            return self._failure(POINTER, exc, None)
        live = self.bundle.bundle_id if self.bundle else None
        if target is None:
            return None
        if target == live:
            self.failed = self._tried = None  # pointed back at the live bundle: nothing is failing now
            return None
        state = None
        try:
            state = await asyncio.to_thread(self._state, target)
            if state == self._tried:
                return None
            bundle = await asyncio.to_thread(check_bundle, bundle_path(self.published, target), self.key)
        except Exception as exc:  # any failure to load must leave the old bundle serving
            return self._failure(target, exc, state)
        self.bundle, self.failed, self._tried = bundle, None, None
        log.info("serving bundle %s (model %s, policy %s)", target, bundle.model_version, bundle.policy_version)
        return None

    def _failure(self, target: str, exc: Exception, state: tuple[Any, ...] | None) -> None:
        error = self._public(f"{type(exc).__name__}: {exc}")
        if self.failed != (target, error):
            live = self.bundle.bundle_id if self.bundle else None
            log.error("bundle %s could not be loaded, still serving %s: %s", target, live, error)
        self.failed, self._tried = (target, error), state

    def _public(self, message: str) -> str:
        """The error without the workspace's absolute path."""
        return message.replace(str(self.published), "published")


class Refused(Exception):
    """A request the live bundle cannot answer: its HTTP status, where in the body and why."""

    def __init__(self, status: int, loc: list[Any], detail: str) -> None:
        super().__init__(detail)
        self.status, self.loc, self.detail = status, loc, detail

    def http(self) -> Exception:
        """As one request's error: a 422 body like a schema error's, or a plain `detail`."""
        if self.status == 422:
            return RequestValidationError([{"type": "value_error", "loc": tuple(self.loc), "msg": self.detail}])
        return HTTPException(self.status, self.detail)


def _short(value: Any) -> Any:
    return value[:MAX_TEXT] + "..." if isinstance(value, str) and len(value) > MAX_TEXT else value


def _problems(errors: list[dict[str, Any]], loc: list[Any]) -> list[dict[str, Any]]:
    """`_problem` of each error, the first `MAX_PROBLEMS` of them: a body of 20,000 junk keys gets a short
    refusal, not one line per key."""
    listed = [_problem(error, loc) for error in errors[:MAX_PROBLEMS]]
    if len(errors) > MAX_PROBLEMS:
        listed.append({"type": "too_many_errors", "loc": [*loc] or ["body"],
                       "msg": f"{len(errors) - MAX_PROBLEMS} more problems not listed"})
    return listed


def _problem(error: dict[str, Any], loc: list[Any]) -> dict[str, Any]:
    """A pydantic error as strict JSON that cannot grow with the input: the offending value is echoed only
    when it is a finite number, a boolean or short text, and a long key in `loc` is cut short."""
    value = error.get("input")
    loc = [_short(part) for part in (*loc, *error["loc"])]
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = (f"unknown feature '{loc[-1]}': not in the feature catalogue (GET /v1/model lists the inputs)"
                   if "features" in loc[:-1] else f"unknown field '{loc[-1]}'")
    problem = {"type": error["type"], "loc": loc, "msg": message}
    safe = (value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value))
            or (isinstance(value, str) and len(value) <= MAX_TEXT))
    if safe and "input" in error:
        problem["input"] = value
    return problem


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
    async def lifespan(app: FastAPI):
        audit = AuditLog(settings.audit_log)
        app.state.audit = audit
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
    app.state.live = live
    app.add_middleware(BodyLimit, max_bytes=service.max_request_bytes)
    app.add_middleware(DurableAnswers)
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key with the needed scope.")

    def scope(name: str):
        def check(key: str | None = Security(key_header)) -> ApiKey:
            found = keyring.identify(key)
            if found is None:
                raise HTTPException(401, "missing or unknown API key in the X-API-Key header")
            if name not in found.scopes:
                raise HTTPException(403, f"API key {found.key_id} lacks the '{name}' scope")
            return found

        return check

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _problems(list(exc.errors()), [])}, status_code=422)

    def answer(bundle: Bundle, scored: Scored, req: ScoreRequest, inputs: dict[str, Any] | None, caller: ApiKey,
               request_id: str) -> dict[str, Any]:
        decision = bundle.decide(scored, req.product, req.requested_amount)
        app.state.audit.write({
            "request_id": request_id,
            "time": datetime.now(UTC).isoformat(),
            "caller": caller.key_id,
            "merchant_id": req.merchant_id,
            "product": req.product,
            "requested_amount": req.requested_amount,
            "features": inputs,
            "inputs_hash": scored.inputs_hash,
            "bundle_id": bundle.bundle_id,
            "model_version": bundle.model_version,
            "policy_version": bundle.policy_version,
            "pd": scored.pd,
            "grade": scored.grade,
            "decision": decision and decision["outcome"],
            "approved_amount": decision and decision["amount"],
            "reasons": [r["code"] for r in scored.reason_codes],
            "policy_reasons": decision and dict(zip(decision["reason_codes"], decision["reasons"])),
        })
        return {
            "request_id": request_id,
            "merchant_id": req.merchant_id,
            "pd": scored.pd,
            "grade": scored.grade,
            "limits": scored.limits,
            "decision": decision,
            "reason_codes": bundle.reasons_given(scored, decision),
            "model_version": bundle.model_version,
            "features_as_of": bundle.features_as_of,
            "policy_version": bundle.policy_version,
            "bundle_id": bundle.bundle_id,
        }

    def check_request(bundle: Bundle, req: ScoreRequest, loc: list[Any]) -> dict[str, Any] | None:
        """Refuse what the live bundle cannot answer; returns the inputs to score of a `features` payload
        (exactly the bundle's inputs: what is scored is what the audit line records)."""
        if req.product is not None and req.product not in bundle.policy.products:
            known = ", ".join(bundle.policy.products)
            raise Refused(422, [*loc, "product"], f"unknown product '{req.product}'; known: {known}")
        features = req.feature_values()
        if features is None:
            if req.merchant_id not in bundle.online:
                raise Refused(404, [*loc, "merchant_id"], f"merchant '{req.merchant_id}' is not in the online store "
                                                          f"of bundle {bundle.bundle_id}; send its features instead")
            return None
        missing = bundle.missing_inputs(features)
        if missing:
            raise Refused(422, [*loc, "features", missing[0]],
                          f"features payload misses {len(missing)} input(s): {', '.join(missing)}; send every "
                          "input of the live model, null when unknown")
        unknown = bundle.unknown_inputs(features)
        allowed = math.floor(service.max_missing_share * len(bundle.model.features))
        if len(unknown) > allowed:
            raise Refused(422, [*loc, "features"],
                          f"{len(unknown)} of the model's {len(bundle.model.features)} inputs are unknown (null, a "
                          f"missing-value code or an unseen category: {', '.join(unknown)}); at most {allowed} may "
                          "be: a PD built on so little is not a decision")
        return {name: features[name] for name in bundle.input_columns}

    @app.post("/v1/score", response_model=ScoreResponse, responses={**ERRORS, **NOT_FOUND, **UNREADABLE},
              tags=["scoring"])
    async def score(req: ScoreRequest, caller: ApiKey = Depends(scope("score"))) -> dict[str, Any]:
        """Score one merchant: online-store lookup by `merchant_id`, or an explicit `features` payload.

        A payload carries every input of the live model (GET /v1/model `inputs`), `null` for a value that is
        unknown; at most `[service].max_missing_share` of the model's inputs may be unknown (null, a
        missing-value code such as -999, or a category the model never saw), more is refused with 422.
        Numbers must be finite JSON numbers; text, booleans and unknown keys are refused with 422 naming
        the field.
        """
        bundle = live.require()
        try:
            inputs = check_request(bundle, req, ["body"])
        except Refused as exc:
            raise exc.http() from None
        if inputs is not None:
            scored = await run_in_threadpool(bundle.score_features, inputs)
        else:
            scored = bundle.online[req.merchant_id]
        return answer(bundle, scored, req, inputs, caller, uuid.uuid4().hex)

    @app.post("/v1/score/batch", response_model=BatchResponse, responses={**ERRORS, **UNREADABLE}, tags=["scoring"])
    async def score_batch(batch: BatchRequest, caller: ApiKey = Depends(scope("score"))) -> dict[str, Any]:
        """Score up to `[service].max_batch_size` requests, each as `/v1/score` would; explicit payloads are
        scored together in one pass.

        Always 200 with one entry per request, in the order sent: its answer, or its error (`status` 404 for
        an unknown merchant, 422 for an invalid item, with `detail` and `loc`); a bad item never fails the
        others. A batch over the size limit is refused whole with 413 before any item is read.
        """
        if len(batch.requests) > service.max_batch_size:
            raise HTTPException(413, f"batch of {len(batch.requests)} requests exceeds max_batch_size "
                                     f"{service.max_batch_size}")
        bundle = live.require()
        results: list[dict[str, Any] | None] = [None] * len(batch.requests)
        accepted: list[tuple[int, ScoreRequest, dict[str, Any] | None]] = []
        for i, item in enumerate(batch.requests):
            loc = ["body", "requests", i]
            try:
                req = ScoreRequest.model_validate(item)
                accepted.append((i, req, check_request(bundle, req, loc)))
            except ValidationError as exc:
                problems = _problems(exc.errors(), loc)
                detail = "; ".join(f"{'.'.join(map(str, p['loc'][3:])) or 'item'}: {p['msg']}" for p in problems)
                results[i] = {"status": 422, "detail": detail, "loc": problems[0]["loc"]}
            except Refused as exc:
                results[i] = {"status": exc.status, "detail": exc.detail, "loc": exc.loc}
        payloads = [inputs for _, _, inputs in accepted if inputs is not None]
        if payloads:
            import pandas as pd

            fresh = iter(await run_in_threadpool(bundle.score_frame, pd.DataFrame(payloads)))
        for i, req, inputs in accepted:
            scored = next(fresh) if inputs is not None else bundle.online[req.merchant_id]
            results[i] = answer(bundle, scored, req, inputs, caller, uuid.uuid4().hex)
        return {"results": results}

    @app.get("/v1/merchants/{merchant_id}/limits", response_model=MerchantLimits,
             responses={**ERRORS, **NOT_FOUND}, tags=["lookup"])
    async def merchant_limits(merchant_id: str, caller: ApiKey = Depends(scope("read"))) -> dict[str, Any]:
        """Current limits per product of an online-store merchant."""
        bundle = live.require()
        scored = bundle.online.get(merchant_id)
        if scored is None:
            raise HTTPException(
                404, f"merchant '{merchant_id}' is not in the online store of bundle {bundle.bundle_id}"
            )
        return {"merchant_id": merchant_id, "pd": scored.pd, "grade": scored.grade, "limits": scored.limits,
                "features_as_of": bundle.features_as_of, "policy_version": bundle.policy_version}

    @app.get("/v1/model", response_model=ModelInfo, responses=ERRORS, tags=["lookup"])
    async def model_info(caller: ApiKey = Depends(scope("read"))) -> dict[str, Any]:
        """What is live: bundle, model, feature set and policy versions, and the inputs a payload needs."""
        bundle = live.require()
        m = bundle.manifest
        return {"bundle_id": bundle.bundle_id, "model_version": bundle.model_version,
                "feature_set_version": m["feature_set_version"], "features_as_of": bundle.features_as_of,
                "policy_version": bundle.policy_version, "created_at": m["created_at"],
                "inputs": bundle.input_columns, "products": list(bundle.policy.products),
                "online_merchants": len(bundle.online)}

    html = {200: {"description": "The report as a self-contained HTML page.",
                  "content": {"text/html": {"schema": {"type": "string"}}}}}

    @app.get("/reports/{version}", responses={**html, **ERRORS, **NOT_FOUND}, tags=["lookup"])
    async def report(version: str, caller: ApiKey = Depends(scope("read"))) -> HTMLResponse:
        """The risk report of a model version, from the newest published bundle that carries it."""
        root = live.published / BUNDLES_DIR
        for bundle_dir in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
            path = bundle_dir / REPORT_FILE
            if (bundle_dir / MANIFEST).is_file() and path.is_file():
                if read_manifest(bundle_dir)["model_version"] == version:
                    return HTMLResponse(path.read_text())
        raise HTTPException(404, f"no published risk report for model version '{version}'")

    static_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The OpenAPI schema, with the live policy's products and grades as the values they may take."""
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

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}, 401: ERRORS[401],
                                                                403: ERRORS[403]}, tags=["operations"])
    async def readyz(key: str | None = Security(key_header)) -> JSONResponse:
        """200 when a bundle is live, 503 when none is (for load balancers: no key needed, and then the
        body says only `ready` or `not_ready`). With a key of the `read` scope: the live bundle id, and
        `degraded` with the reason when a newer published bundle failed to load."""
        bundle, failed = live.bundle, live.failed
        code = 503 if bundle is None else 200
        if key is None:
            return JSONResponse({"status": "not_ready" if bundle is None else "ready", "bundle_id": None,
                                 "detail": None}, status_code=code)
        scope("read")(key)
        if bundle is None:
            return JSONResponse({"status": "not_ready", "bundle_id": None, "detail": failed and failed[1]},
                                status_code=code)
        if failed:
            detail = f"bundle {failed[0]} failed to load, still serving {bundle.bundle_id}: {failed[1]}"
            return JSONResponse({"status": "degraded", "bundle_id": bundle.bundle_id, "detail": detail})
        return JSONResponse({"status": "ready", "bundle_id": bundle.bundle_id, "detail": None})

    return app
