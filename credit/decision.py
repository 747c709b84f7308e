"""Decide one credit request against the limits table: approve, counter-offer, refer or decline, with reasons.

The reasons are plain sentences built from the policy's own numbers, each with a stable code, so a
declined or reduced merchant is told which rule applied (adverse-action notice) and an officer sees why a
request was referred. Codes: `exclusion.<rule>` (`credit.limits.EXCLUSIONS`), `limit.<constraint>`
(`credit.limits.CONSTRAINTS`), `request.within_limit | above_limit | far_above_limit | no_limit`, and
`monitoring.freeze | cut | escalate` when the day's early-warning alerts changed the row (`credit.monitoring`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from credit.limits import apr_floor
from credit.policy import CreditPolicy, ProductPolicy


class Outcome(StrEnum):
    APPROVE = "approve"
    COUNTER_OFFER = "counter_offer"
    REFER = "refer"
    DECLINE = "decline"


class CreditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    merchant_id: str = Field(min_length=1)
    product: str = Field(min_length=1)
    requested_amount: Annotated[float, Field(gt=0.0)]


ADVERSE = frozenset({Outcome.DECLINE, Outcome.COUNTER_OFFER})
"""Outcomes that refuse or reduce what was asked: the merchant is owed the reasons (adverse action)."""


@dataclass(frozen=True)
class PolicyReason:
    code: str
    """Stable across policy versions (see the module docstring)."""
    description: str
    """The sentence the merchant or officer reads, with the policy's and the request's numbers."""


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    amount: float
    """Amount offered: the request when approved, the limit on a counter-offer, 0 otherwise."""
    limit: float
    apr: float | None
    tenor_days: int
    reasons: tuple[PolicyReason, ...]
    """The rule that decided first."""
    policy_version: str


def _plain(product: str) -> str:
    return product.replace("_", " ")


def exclusion_reason(code: str, row: Mapping[str, Any], product: str, terms: ProductPolicy) -> str:
    """Why a merchant is not eligible for a product, in plain words with the policy's numbers (`row` is
    the merchant's limit-table row); `credit.limits.EXCLUSION_RULES` names the rules without numbers."""
    name = _plain(product)
    match code:
        case "segment":
            return f"{name} is offered only to {' and '.join(terms.segments)} merchants"
        case "tenure":
            return f"fewer than {terms.min_tenure_days} days selling on the platform, the minimum for {name}"
        case "sales":
            return f"net sales of the last 90 days below {terms.min_net_sales_90d:,.0f}, the minimum for {name}"
        case "grade":
            return f"risk grade {row['grade']} is worse than {terms.worst_grade}, the worst grade {name} accepts"
        case "apr_cap":
            apr = float(apr_floor(row["pd"], terms))
            return f"the risk-based rate {apr:.1%} would exceed the {terms.pricing.max_apr:.0%} cap of {name}"
        case "min_limit":
            return f"the {name} limit the merchant qualifies for is below the {terms.min_limit:,.0f} minimum"
    raise AssertionError(f"unknown exclusion code {code!r}")  # pragma: no cover


def binding_reason(constraint: str, row: dict[str, Any], product: str, terms: ProductPolicy) -> str:
    """What holds the limit where it is."""
    match constraint:
        case "absolute_cap":
            return f"{_plain(product)} limits are capped at {terms.max_limit:,.0f}"
        case "concentration_cap":
            return f"the limit is capped at {terms.max_sales_share:.0%} of 90-day net sales"
        case "collateral":
            rate = terms.advance_rate[row["grade"]]
            base = terms.base.kind.replace("_", " ")
            return (
                f"the limit is {rate:.0%} of the {base} ({row['exposure_base']:,.0f}) at grade {row['grade']}"
            )
        case "el_budget":
            return (f"at PD {row['pd']:.2%} a larger limit would exceed the expected-loss budget of "
                    f"{terms.el_budget:,.0f}")
    raise AssertionError(f"unknown constraint {constraint!r}")  # pragma: no cover


def decide(request: CreditRequest, limits: pd.DataFrame, policy: CreditPolicy) -> Decision:
    """Decide a request from the merchant's row of the limits table (`compute_limits` output)."""
    match = limits[(limits["merchant_id"] == request.merchant_id) & (limits["product"] == request.product)]
    return decide_row(request, None if match.empty else match.iloc[0].to_dict(), policy)


def decide_row(request: CreditRequest, row: Mapping[str, Any] | None, policy: CreditPolicy) -> Decision:
    """Decide a request from the merchant's own limit row (None: no row on file); the rules of `decide`.

    For callers that already hold the row, like the scoring service: filtering a frame costs milliseconds
    per request, this microseconds.
    """
    terms = policy.product(request.product)  # unknown product: PolicyError naming the known ones

    def decision(outcome: Outcome, amount: float, limit: float, apr: float | None,
                 *reasons: tuple[str, str]) -> Decision:
        return Decision(outcome, amount, limit, apr, terms.tenor_days,
                        tuple(PolicyReason(code, text) for code, text in reasons), policy.version)

    if row is None:
        return decision(Outcome.REFER, 0.0, 0.0, None,
                        ("request.no_limit", f"no {request.product} limit on file for {request.merchant_id}"))
    limit, asked = float(row["limit"]), request.requested_amount
    if not row["eligible"]:
        code = row["exclusion_reason"]
        return decision(Outcome.DECLINE, 0.0, 0.0, None,
                        (f"exclusion.{code}", exclusion_reason(code, row, request.product, terms)))
    monitoring = tuple((r["code"], r["description"]) for r in row.get("monitoring_reasons") or ())
    action = row.get("monitoring_action")
    if action == "freeze":
        return decision(Outcome.DECLINE, 0.0, 0.0, None, *monitoring)
    apr = float(row["apr"])
    if action == "escalate":
        return decision(Outcome.REFER, 0.0, limit, apr, *monitoring)
    if asked <= limit:
        return decision(Outcome.APPROVE, asked, limit, apr,
                        ("request.within_limit", f"requested {asked:,.0f} is within the limit of {limit:,.0f}"),
                        *monitoring)
    why = monitoring if action == "cut" else (
        (f"limit.{row['binding_constraint']}", binding_reason(row["binding_constraint"], row, request.product, terms)),)
    if asked > policy.decision.refer_ratio * limit:
        ratio = policy.decision.refer_ratio
        return decision(
            Outcome.REFER, 0.0, limit, apr,
            ("request.far_above_limit", f"requested {asked:,.0f} is more than {ratio:g} x the limit of {limit:,.0f}"),
            *why,
        )
    return decision(
        Outcome.COUNTER_OFFER, limit, limit, apr,
        ("request.above_limit", f"requested {asked:,.0f} exceeds the limit of {limit:,.0f}"),
        *why,
    )
