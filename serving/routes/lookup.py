"""What is live, read by the loan engine and risk officers: a merchant's limits, the model, its report."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import HTMLResponse

from serving import dependencies as deps
from serving.auth import ApiKey
from serving.bundle import BUNDLES_DIR, MANIFEST, REPORT_FILE, Bundle, read_manifest
from serving.live import LiveBundle
from serving.problems import ERRORS, NOT_FOUND
from serving.schemas import MerchantAlerts, MerchantLimits, ModelInfo

router = APIRouter(tags=["lookup"])
HTML = {200: {"description": "The report as a self-contained HTML page.",
              "content": {"text/html": {"schema": {"type": "string"}}}}}


@router.get("/v1/merchants/{merchant_id}/limits", response_model=MerchantLimits, responses={**ERRORS, **NOT_FOUND})
async def merchant_limits(merchant_id: str, caller: ApiKey = Depends(deps.scope("read")),
                          bundle: Bundle = Depends(deps.bundle)) -> dict[str, Any]:
    """Current limits per product of an online-store merchant."""
    scored = bundle.online.get(merchant_id)
    if scored is None:
        raise HTTPException(404, f"merchant '{merchant_id}' is not in the online store of bundle {bundle.bundle_id}")
    return {"merchant_id": merchant_id, "pd": scored.pd, "grade": scored.grade, "limits": scored.limits,
            "features_as_of": bundle.features_as_of, "policy_version": bundle.policy_version}


@router.get("/v1/merchants/{merchant_id}/alerts", response_model=MerchantAlerts, responses={**ERRORS, **NOT_FOUND})
async def merchant_alerts(merchant_id: str, caller: ApiKey = Depends(deps.scope("read")),
                          bundle: Bundle = Depends(deps.bundle)) -> dict[str, Any]:
    """The early-warning alerts on a merchant's live loans in the live bundle (`scfrisk monitor`): each with
    its signal, evidence, action and reason. Empty when none fired."""
    alerts = bundle.alerts_of(merchant_id)
    if not alerts and merchant_id not in bundle.online:
        raise HTTPException(404, f"merchant '{merchant_id}' is not in the online store of bundle {bundle.bundle_id}")
    as_of = bundle.manifest.get("alerts_as_of")
    return {"merchant_id": merchant_id, "as_of": as_of, "bundle_id": bundle.bundle_id, "alerts": alerts}


@router.get("/v1/model", response_model=ModelInfo, responses=ERRORS)
async def model_info(caller: ApiKey = Depends(deps.scope("read")),
                     bundle: Bundle = Depends(deps.bundle)) -> dict[str, Any]:
    """What is live: bundle, model, feature set and policy versions, and the inputs a payload needs."""
    m = bundle.manifest
    return {"bundle_id": bundle.bundle_id, "model_version": bundle.model_version,
            "feature_set_version": m["feature_set_version"], "features_as_of": bundle.features_as_of,
            "policy_version": bundle.policy_version, "created_at": m["created_at"],
            "inputs": bundle.input_columns, "products": list(bundle.policy.products),
            "online_merchants": len(bundle.online), "accepts_records": bundle.on_demand_problem() is None}


@router.get("/reports/{version}", responses={**HTML, **ERRORS, **NOT_FOUND})
async def report(version: str, caller: ApiKey = Depends(deps.scope("read")),
                 live: LiveBundle = Depends(deps.live)) -> HTMLResponse:
    """The risk report of a model version, from the newest published bundle that carries it."""
    root = live.published / BUNDLES_DIR
    for bundle_dir in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
        path = bundle_dir / REPORT_FILE
        if (bundle_dir / MANIFEST).is_file() and path.is_file():
            if read_manifest(bundle_dir)["model_version"] == version:
                return HTMLResponse(path.read_text())
    raise HTTPException(404, f"no published risk report for model version '{version}'")
