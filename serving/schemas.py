"""Request and response bodies of the scoring API; they are its OpenAPI contract.

Every value a client sends is typed here, so nothing the model, the limit engine or the audit log cannot
take reaches them: feature values are typed from the feature catalogue (numbers are finite JSON numbers,
categories short text, `null` means unknown), unknown keys are refused, and text is short, which also
bounds the size of an audit line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    Strict,
    create_model,
    field_validator,
    model_validator,
)

from core.schemas import TABLES
from credit.limits import CONSTRAINTS
from features.definitions import FEATURES, Feature
from features.on_demand import PROFILE, RECORD_TABLES

Number = Annotated[float, Strict(), AllowInfNan(False)]
"""A finite JSON number: no `NaN` or `Infinity` (Python's JSON parser reads both, and `1e999`), no text, no
`true`; integers are taken as floats, so a value is logged and hashed as what was scored."""
MAX_TEXT = 64
"""Longest text value (ids, products, categories): every real one is a short word."""
Text = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_TEXT)]
RecordValue = Annotated[int, Strict()] | Number | Text | bool | None
"""A raw column's value as JSON gives it (an integer stays one, for ids); the data model's rules check its
type (timestamps: ISO 8601 text, naive UTC, as in docs/data.md)."""
ScoringMode = Literal["online", "features", "records"]
UNIT_EXAMPLES: dict[str, float] = {"CNY": 48_000.0, "ratio": 0.04, "days": 35.0, "count": 12.0, "stars": 4.6,
                                   "minutes": 42.0, "months": 6.0}
"""An illustrative value per catalogue unit for the OpenAPI examples (not a default, never scored)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _feature_field(feature: Feature) -> tuple[Any, Any]:
    if feature.kind == "categorical":
        return Text | None, Field(None, description=f"{feature.description} Text; a level the model never saw "
                                                      "counts as unknown.")
    return Number | None, Field(None, description=f"{feature.description} Unit: {feature.unit}.",
                                examples=[UNIT_EXAMPLES.get(feature.unit, 1.0)])


Features = create_model(
    "Features",
    __config__=ConfigDict(extra="forbid", json_schema_extra={
        "description": "Feature values by catalogue name (docs/features.md). Send every input the live model "
                       "reads (GET /v1/model `inputs`), `null` when a value is unknown; a key outside the "
                       "catalogue is refused."}),
    **{feature.name: _feature_field(feature) for feature in FEATURES},
)
"""An explicit feature payload: one optional field per catalogue feature, typed by its kind."""


def _record_rows(name: str) -> tuple[Any, Any]:
    what = f"Rows of `{name}` in the columns of docs/data.md: {TABLES[name].description}"
    if name == PROFILE:
        return list[dict[Text, RecordValue]], Field(min_length=1, max_length=1,
                                                     description=f"{what} Exactly one: the merchant's profile.")
    return list[dict[Text, RecordValue]], Field(default_factory=list, description=what)


MerchantRecords = create_model(
    "MerchantRecords",
    __config__=ConfigDict(extra="forbid", json_schema_extra={
        "description": "A merchant's raw records, one list per raw table the features read, in the columns of "
                       "ingestion and checked by its rules; an omitted column is empty."}),
    **{name: _record_rows(name) for name in RECORD_TABLES},
)
"""The `records` of a request, generated from the data model so it cannot lag behind the feature definitions."""


class ScoreRequest(_Body):
    """Score an online-store merchant by id, any merchant from an explicit `features` payload, or from its raw
    `records` (features computed on demand as of `as_of`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"merchant_id": "M0000042", "product": "order_financing", "requested_amount": 20000},
        {"merchant_id": "M0000042"},
    ]})

    merchant_id: str | None = Field(None, min_length=1, max_length=MAX_TEXT, pattern=r"^[A-Za-z0-9_.-]+$",
                                    strict=True)
    features: Features | None = Field(  # type: ignore[valid-type]
        None, description="Feature values by name; scored on the fly when given (then `merchant_id` only labels "
                          "the answer).",
    )
    product: Text | None = Field(None, description="Product requested: one of the live policy's products "
                                                   "(GET /v1/model `products`).")
    requested_amount: Number | None = Field(None, gt=0, le=1e12, description="Amount asked for, in CNY.")
    records: MerchantRecords | None = Field(  # type: ignore[valid-type]
        None, description="The merchant's raw records (its profile, orders, events, ...); the service computes "
                          "its features from them as of `as_of` and scores them as a `features` payload. Not with "
                          "`features`; at most `[service].max_records` rows.")
    as_of: datetime | None = Field(
        None, ge=datetime(1970, 1, 1), description="With `records`: compute the features as of this time (UTC; "
                                                   "default: the request's time). Only facts before it count.")

    @field_validator("as_of")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """Naive UTC, as the data model's timestamps are."""
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC).replace(tzinfo=None)

    @model_validator(mode="after")
    def _merchant_or_features(self) -> ScoreRequest:
        if self.merchant_id is None and self.features is None and self.records is None:
            raise ValueError("give a merchant_id (online store), a features payload or the merchant's records")
        if (self.requested_amount is None) != (self.product is None):
            raise ValueError("product and requested_amount go together: give both for a decision, or neither")
        return self

    @model_validator(mode="after")
    def _records_alone(self) -> ScoreRequest:
        if self.records is None:
            if self.as_of is not None:
                raise ValueError("as_of goes with records: the online store and a features payload have theirs")
            return self
        if self.features is not None:
            raise ValueError("give features or records, not both")
        profile = getattr(self.records, PROFILE)[0].get("merchant_id")
        if self.merchant_id is not None and self.merchant_id != profile:
            raise ValueError(f"merchant_id '{self.merchant_id}' is not the records' merchant ({profile!r})")
        return self

    def record_rows(self) -> dict[str, list[dict[str, Any]]] | None:
        """The records as sent, by table (every table the features read; empty when not sent)."""
        return None if self.records is None else dict(self.records)

    def feature_values(self) -> dict[str, float | str | None] | None:
        """The payload's features as sent: absent ones left out, `null` ones kept as None."""
        return None if self.features is None else self.features.model_dump(exclude_unset=True)


class BatchRequest(_Body):
    """Up to `[service].max_batch_size` requests. Each item is validated on its own: an invalid item gets its
    own error in the answer and the others are still scored."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"requests": [
        {"merchant_id": "M0000042", "product": "order_financing", "requested_amount": 20000},
        {"merchant_id": "M0000043"},
    ]}]})

    requests: list[SkipValidation[ScoreRequest]] = Field(min_length=1)


class MonitoringReason(BaseModel):
    code: Literal["monitoring.freeze", "monitoring.cut", "monitoring.escalate"]
    description: str


class ProductLimit(BaseModel):
    product: str
    eligible: bool
    limit: float = Field(description="0 when not eligible.")
    binding_constraint: Literal[CONSTRAINTS] | None = Field(  # type: ignore[valid-type]
        description="What caps the limit; null when not eligible.")
    apr: float | None = Field(description="Risk-based annual rate; null when not eligible.")
    expected_loss: float
    exclusion_reason: str | None = Field(description="First eligibility rule failed; null when eligible.")
    exclusion_description: str | None = Field(
        None, description="That rule in plain language, with the policy's numbers; null when eligible.")
    monitoring_action: Literal["freeze", "cut", "escalate"] | None = Field(
        None, description="What the early-warning alerts of the live bundle do to this limit: `freeze` (limit 0, "
                          "new drawdowns declined), `cut` (limit lowered), `escalate` (requests referred to an "
                          "officer); null when none applies (GET /v1/merchants/{id}/alerts lists the alerts).")
    monitoring_reasons: list[MonitoringReason] = Field(
        [], description="Why, one entry per alert that acts on this product.")


class ReasonCode(BaseModel):
    code: str = Field(description="Stable: a policy rule (`exclusion.sales`, `limit.collateral`...) or a feature name.")
    description: str
    source: Literal["policy", "model"] = Field(
        "model", description="`policy`: the rule that declined or reduced the request; `model`: a factor that "
                             "raised the PD, with the merchant's value against the typical approved merchant's.")


class Decision(BaseModel):
    outcome: Literal["approve", "counter_offer", "refer", "decline"]
    amount: float = Field(description="Offered: the request when approved, the limit on a counter-offer, else 0.")
    limit: float
    apr: float | None
    tenor_days: int
    reasons: list[str] = Field(description="Plain-language reasons, in the words of the policy.")
    reason_codes: list[str] = Field([], description="Stable code of each of `reasons`, in the same order.")


_LIMIT_EXAMPLE = {"product": "order_financing", "eligible": True, "limit": 60000.0,
                  "binding_constraint": "collateral", "apr": 0.142, "expected_loss": 412.5, "exclusion_reason": None}
_ANSWER_EXAMPLE = {
    "request_id": "5f0c3b8e2a7d4f1e9b6a0c2d4e6f8a1b", "merchant_id": "M0000042", "scoring_mode": "online",
    "pd": 0.0213, "grade": "D",
    "limits": [_LIMIT_EXAMPLE, {"product": "microloan", "eligible": False, "limit": 0.0, "binding_constraint": None,
                                "apr": None, "expected_loss": 0.0, "exclusion_reason": "grade"}],
    "decision": {"outcome": "approve", "amount": 20000.0, "limit": 60000.0, "apr": 0.142, "tenor_days": 90,
                 "reasons": ["requested 20,000 is within the limit of 60,000"]},
    "reason_codes": [{"code": "late_delivery_rate_90d",
                      "description": "Share of orders delivered late in the last 90 days: 9%; typical: 3%"}],
    "model_version": "3", "features_as_of": "2026-11-01T00:00:00", "policy_version": "2026.11",
    "bundle_id": "20261101T020000000000Z-1a2b3c4d",
}
_ITEM_ERROR_EXAMPLE = {"status": 404, "detail": "merchant 'M9999999' is not in the online store of bundle "
                                                "20261101T020000000000Z-1a2b3c4d; send its features instead",
                       "loc": ["body", "requests", 1, "merchant_id"]}


class ScoreResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_ANSWER_EXAMPLE]})

    request_id: str
    merchant_id: str | None
    scoring_mode: ScoringMode = Field(description="What was scored: the online store's features of `merchant_id`, "
                                                  "the explicit `features`, or features computed from `records`.")
    pd: float = Field(ge=0.0, le=1.0)
    grade: str
    limits: list[ProductLimit]
    decision: Decision | None = Field(description="Present when a product and an amount were requested.")
    reason_codes: list[ReasonCode] = Field(
        max_length=4, description="What to tell the merchant: on a decline or counter-offer the policy's reasons "
                                  "first, then the model factors that raised the PD; otherwise those factors.")
    model_version: str
    features_as_of: str
    policy_version: str
    bundle_id: str


class BatchItemError(BaseModel):
    """Why one item of a batch got no answer; the other items are answered all the same."""

    model_config = ConfigDict(json_schema_extra={"examples": [_ITEM_ERROR_EXAMPLE]})

    status: Literal[404, 422] = Field(description="The status the item would have had alone: 404 unknown merchant, "
                                                  "422 invalid item.")
    detail: str = Field(description="What is wrong, in words; every problem of the item.")
    loc: list[str | int] = Field(description="Where its first problem is, as in a 422 body: "
                                             "`body`, `requests`, the item's index, then the field.")


class BatchResponse(BaseModel):
    """One entry per request, in the order sent: an answer, or the item's error (it has `status`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [_ANSWER_EXAMPLE, _ITEM_ERROR_EXAMPLE]}]})

    results: list[ScoreResponse | BatchItemError]


class MerchantLimits(BaseModel):
    merchant_id: str
    pd: float
    grade: str
    limits: list[ProductLimit]
    features_as_of: str
    policy_version: str


class Alert(BaseModel):
    loan_id: int
    product: str
    signal: Literal["pd_migration", "sales_drop", "refund_spike", "complaint_spike", "shipping_delay",
                    "overdue_receivables", "days_past_due", "collateral_released", "margin_call",
                    "financed_receivable_overdue"] = Field(description="The early-warning signal that fired "
                                                                   "(a table of the policy's `[monitoring]`).")
    evidence: dict[str, float | int | str | None] = Field(
        description="The figures that fired it, by name: a feature of the catalogue (docs/features.md) or a "
                    "loan figure such as `pd_now`, `days_past_due`, `ltv`.")
    action: Literal["watch", "freeze", "cut", "call_collateral", "escalate"]
    cut_share: float | None = Field(description="Share of the limit a `cut` takes away; null otherwise.")
    reason: str = Field(description="Why, in plain language, with the figures.")


class MerchantAlerts(BaseModel):
    merchant_id: str
    as_of: str | None = Field(description="Day the alerts were computed for; null when the live bundle carries "
                                          "no alerts (no `scfrisk monitor` run published it).")
    bundle_id: str
    alerts: list[Alert] = Field(description="One per live loan and signal that fired; empty when none did.")


class ModelInfo(BaseModel):
    bundle_id: str
    model_version: str
    feature_set_version: str
    features_as_of: str
    policy_version: str
    created_at: str
    inputs: list[str] = Field(description="Feature names an explicit `features` payload must carry (`null` when "
                                          "unknown).")
    products: list[str]
    online_merchants: int
    accepts_records: bool = Field(description="Whether `records` can be scored: the service computes the "
                                              "feature set the live model was trained on.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not_ready"]
    bundle_id: str | None
    detail: str | None


class Problem(BaseModel):
    detail: str
