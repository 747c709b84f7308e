"""Request and response bodies of the scoring API; they are its OpenAPI contract."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FeatureValue = float | str | bool | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Body):
    """Score an online-store merchant by id, or any merchant from an explicit `features` payload."""

    merchant_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    features: dict[str, FeatureValue] | None = Field(
        None, description="Feature values by name (see GET /v1/model); scored on the fly when given.",
        max_length=500,
    )
    product: str | None = Field(None, min_length=1, max_length=64, description="Product requested; a policy product.")
    requested_amount: float | None = Field(None, gt=0, le=1e12)

    @model_validator(mode="after")
    def _merchant_or_features(self) -> ScoreRequest:
        if self.merchant_id is None and self.features is None:
            raise ValueError("give a merchant_id (online store) or a features payload")
        if (self.requested_amount is None) != (self.product is None):
            raise ValueError("product and requested_amount go together: give both for a decision, or neither")
        return self


class BatchRequest(_Body):
    requests: list[ScoreRequest] = Field(min_length=1)


class ProductLimit(BaseModel):
    product: str
    eligible: bool
    limit: float = Field(description="0 when not eligible.")
    binding_constraint: str | None = Field(description="What caps the limit; null when not eligible.")
    apr: float | None = Field(description="Risk-based annual rate; null when not eligible.")
    expected_loss: float
    exclusion_reason: str | None = Field(description="First eligibility rule failed; null when eligible.")
    exclusion_description: str | None = Field(
        None, description="That rule in plain language, with the policy's numbers; null when eligible.")


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


class ScoreResponse(BaseModel):
    request_id: str
    merchant_id: str | None
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


class BatchResponse(BaseModel):
    results: list[ScoreResponse]


class MerchantLimits(BaseModel):
    merchant_id: str
    pd: float
    grade: str
    limits: list[ProductLimit]
    features_as_of: str
    policy_version: str


class ModelInfo(BaseModel):
    bundle_id: str
    model_version: str
    feature_set_version: str
    features_as_of: str
    policy_version: str
    created_at: str
    inputs: list[str] = Field(description="Feature names an explicit `features` payload must carry.")
    products: list[str]
    online_merchants: int


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not_ready"]
    bundle_id: str | None
    detail: str | None


class Problem(BaseModel):
    detail: str
