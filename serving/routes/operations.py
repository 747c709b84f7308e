"""For load balancers and operators: is the process up, is a bundle live (and, with a key, which one)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse

from serving import dependencies as deps
from serving.live import LiveBundle
from serving.problems import ERRORS
from serving.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}, 401: ERRORS[401],
                                                             403: ERRORS[403]})
async def readyz(request: Request, key: str | None = Security(deps.key_header),
                 live: LiveBundle = Depends(deps.live)) -> JSONResponse:
    """200 when a bundle is live, 503 when none is (for load balancers: no key needed, and then the
    body says only `ready` or `not_ready`). With a key of the `read` scope: the live bundle id, and
    `degraded` with the reason when a newer published bundle failed to load."""
    bundle, failed = live.bundle, live.failed
    code = 503 if bundle is None else 200
    if key is None:
        return JSONResponse({"status": "not_ready" if bundle is None else "ready", "bundle_id": None,
                             "detail": None}, status_code=code)
    deps.caller_with("read", request, key)
    if bundle is None:
        return JSONResponse({"status": "not_ready", "bundle_id": None, "detail": failed and failed[1]},
                            status_code=code)
    if failed:
        detail = f"bundle {failed[0]} failed to load, still serving {bundle.bundle_id}: {failed[1]}"
        return JSONResponse({"status": "degraded", "bundle_id": bundle.bundle_id, "detail": detail})
    return JSONResponse({"status": "ready", "bundle_id": bundle.bundle_id, "detail": None})
