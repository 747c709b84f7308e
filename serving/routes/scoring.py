"""The loan engine's routes: score one merchant, or a batch, and log every decision before answering."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from core.settings import Settings
from features.on_demand import InvalidRecords, MerchantFeatures, RecordsError, features_from_records
from serving import dependencies as deps
from serving.audit import AuditLog, inputs_hash
from serving.auth import ApiKey
from serving.bundle import Bundle, Scored
from serving.live import LiveBundle
from serving.problems import (
    ERRORS,
    NO_ON_DEMAND,
    NOT_FOUND,
    UNREADABLE,
    Refused,
    now,
    problems,
    records_rejected,
)
from serving.schemas import BatchRequest, BatchResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["scoring"])


@router.post("/v1/score", response_model=ScoreResponse, responses={**ERRORS, **NOT_FOUND, **UNREADABLE, **NO_ON_DEMAND})
async def score(req: ScoreRequest, caller: ApiKey = Depends(deps.scope("score")),
                live: LiveBundle = Depends(deps.live), settings: Settings = Depends(deps.settings),
                audit: AuditLog = Depends(deps.audit)) -> dict[str, Any]:
    """Score one merchant: online-store lookup by `merchant_id`, an explicit `features` payload, or the
    features computed on demand from its raw `records` (checked by the rules of ingestion, a 422 naming
    table, column, rule and row count otherwise), as of `as_of`.

    A payload carries every input of the live model (GET /v1/model `inputs`), `null` for a value that is
    unknown; at most `[service].max_missing_share` of the model's inputs may be unknown (null, a
    missing-value code such as -999, or a category the model never saw), more is refused with 422.
    Numbers must be finite JSON numbers; text, booleans and unknown keys are refused with 422 naming
    the field.
    """
    bundle = live.require()
    computed = None
    try:
        inputs = check_request(bundle, req, ["body"], settings)
        if req.records is not None:
            inputs, computed = await records_inputs(bundle, req, settings)
    except Refused as exc:
        raise exc.http() from None
    if inputs is not None:
        about = computed.merchant_id if computed else req.merchant_id  # its alerts apply, as on replay
        scored = await run_in_threadpool(bundle.score_features, inputs, about)
    else:
        scored = bundle.online[req.merchant_id]
    return answer(audit, bundle, scored, req, inputs, caller, uuid.uuid4().hex, computed)


@router.post("/v1/score/batch", response_model=BatchResponse, responses={**ERRORS, **UNREADABLE})
async def score_batch(batch: BatchRequest, caller: ApiKey = Depends(deps.scope("score")),
                      live: LiveBundle = Depends(deps.live), settings: Settings = Depends(deps.settings),
                      audit: AuditLog = Depends(deps.audit)) -> dict[str, Any]:
    """Score up to `[service].max_batch_size` requests, each as `/v1/score` would; explicit payloads are
    scored together in one pass.

    Always 200 with one entry per request, in the order sent: its answer, or its error (`status` 404 for
    an unknown merchant, 422 for an invalid item, with `detail` and `loc`); a bad item never fails the
    others. A batch over the size limit is refused whole with 413 before any item is read.
    """
    limit = settings.service.max_batch_size
    if len(batch.requests) > limit:
        raise HTTPException(413, f"batch of {len(batch.requests)} requests exceeds max_batch_size {limit}")
    bundle = live.require()
    results: list[dict[str, Any] | None] = [None] * len(batch.requests)
    accepted: list[tuple[int, ScoreRequest, dict[str, Any] | None]] = []
    for i, item in enumerate(batch.requests):
        loc = ["body", "requests", i]
        try:
            req = ScoreRequest.model_validate(item)
            if req.records is not None:
                raise Refused(422, [*loc, "records"], "records are scored one merchant a request: POST them "
                                                      "to /v1/score")
            accepted.append((i, req, check_request(bundle, req, loc, settings)))
        except ValidationError as exc:
            listed = problems(exc.errors(), loc)
            detail = "; ".join(f"{'.'.join(map(str, p['loc'][3:])) or 'item'}: {p['msg']}" for p in listed)
            results[i] = {"status": 422, "detail": detail, "loc": listed[0]["loc"]}
        except Refused as exc:
            results[i] = {"status": exc.status, "detail": exc.detail, "loc": exc.loc}
    payloads = [inputs for _, _, inputs in accepted if inputs is not None]
    if payloads:
        import pandas as pd

        about = [req.merchant_id for _, req, inputs in accepted if inputs is not None]
        fresh = iter(await run_in_threadpool(bundle.score_frame, pd.DataFrame(payloads), about))
    for i, req, inputs in accepted:
        scored = next(fresh) if inputs is not None else bundle.online[req.merchant_id]
        results[i] = answer(audit, bundle, scored, req, inputs, caller, uuid.uuid4().hex)
    return {"results": results}


def answer(audit: AuditLog, bundle: Bundle, scored: Scored, req: ScoreRequest, inputs: dict[str, Any] | None,
           caller: ApiKey, request_id: str, computed: MerchantFeatures | None = None) -> dict[str, Any]:
    """The decision on a scored request: its audit line written first, then the answer."""
    decision = bundle.decide(scored, req.product, req.requested_amount)
    mode = "records" if computed else "online" if inputs is None else "features"
    on_demand = computed and {
        # Replay needs the inputs scored, logged as for a payload; the records stay out (they can be large
        # and hold buyers' ids): their hash proves which ones gave the inputs to anyone who holds them.
        "merchant_id": computed.merchant_id,
        "records_hash": inputs_hash(req.record_rows()),  # type: ignore[arg-type]
        "records_rows": {name: len(rows) for name, rows in req.record_rows().items()},  # type: ignore[union-attr]
        "as_of": computed.as_of.isoformat(),
        "feature_set_version": bundle.manifest["feature_set_version"],
    }
    audit.write({
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
        "scoring_mode": mode,
        **(on_demand or {}),
    })
    return {
        "request_id": request_id,
        "merchant_id": computed.merchant_id if computed else req.merchant_id,
        "scoring_mode": mode,
        "pd": scored.pd,
        "grade": scored.grade,
        "limits": scored.limits,
        "decision": decision,
        "reason_codes": bundle.reasons_given(scored, decision),
        "model_version": bundle.model_version,
        "features_as_of": computed.as_of.isoformat() if computed else bundle.features_as_of,
        "policy_version": bundle.policy_version,
        "bundle_id": bundle.bundle_id,
    }


def check_request(bundle: Bundle, req: ScoreRequest, loc: list[Any], settings: Settings) -> dict[str, Any] | None:
    """Refuse what the live bundle cannot answer; returns the inputs to score of a `features` payload
    (exactly the bundle's inputs: what is scored is what the audit line records)."""
    if req.product is not None and req.product not in bundle.policy.products:
        known = ", ".join(bundle.policy.products)
        raise Refused(422, [*loc, "product"], f"unknown product '{req.product}'; known: {known}")
    features = req.feature_values()
    if features is None:
        if req.records is None and req.merchant_id not in bundle.online:
            raise Refused(404, [*loc, "merchant_id"], f"merchant '{req.merchant_id}' is not in the online store "
                                                      f"of bundle {bundle.bundle_id}; send its features instead")
        return None
    return payload_inputs(bundle, features, [*loc, "features"], settings)


def payload_inputs(bundle: Bundle, features: dict[str, Any], loc: list[Any], settings: Settings) -> dict[str, Any]:
    """The inputs to score of feature values (sent, or computed from records): exactly the bundle's
    inputs, refused when one is absent or too many are unknown."""
    missing = bundle.missing_inputs(features)
    if missing:
        raise Refused(422, [*loc, missing[0]],
                      f"features payload misses {len(missing)} input(s): {', '.join(missing)}; send every "
                      "input of the live model, null when unknown")
    unknown = bundle.unknown_inputs(features)
    allowed = math.floor(settings.service.max_missing_share * len(bundle.model.features))
    if len(unknown) > allowed:
        raise Refused(422, loc,
                      f"{len(unknown)} of the model's {len(bundle.model.features)} inputs are unknown (null, a "
                      f"missing-value code or an unseen category: {', '.join(unknown)}); at most {allowed} may "
                      "be: a PD built on so little is not a decision")
    return {name: features[name] for name in bundle.input_columns}


async def records_inputs(bundle: Bundle, req: ScoreRequest,
                         settings: Settings) -> tuple[dict[str, Any], MerchantFeatures]:
    """The features of a request's records, computed on demand, as the inputs a payload would give. Refused
    first: more than `max_records` rows (413), a model of another feature set (409), an as_of in the
    future (422); then any record breaking a rule of ingestion (422, one error per rule)."""
    records, at = req.record_rows(), now()
    service, ingest = settings.service, settings.ingest
    rows = sum(map(len, records.values()))  # type: ignore[union-attr]
    if rows > service.max_records:
        raise Refused(413, ["body", "records"], f"records hold {rows} rows, more than max_records "
                                                f"{service.max_records}")
    problem = bundle.on_demand_problem()
    if problem:
        raise Refused(409, ["body", "records"], problem)
    if req.as_of is not None and req.as_of > at + timedelta(seconds=ingest.allow_future_seconds):
        raise Refused(422, ["body", "as_of"], f"as_of {req.as_of.isoformat()} is in the future (now "
                                              f"{at.isoformat()})")
    try:
        computed = await run_in_threadpool(
            features_from_records, records, req.as_of or at, now=at,  # type: ignore[arg-type]
            allow_future_seconds=ingest.allow_future_seconds, max_examples=ingest.max_failure_examples,
            settings=settings)
    except InvalidRecords as exc:
        raise records_rejected(exc) from None
    except RecordsError as exc:
        raise Refused(422, ["body", "records"], str(exc)) from None
    return payload_inputs(bundle, computed.features, ["body", "records"], settings), computed
