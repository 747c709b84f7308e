"""Credit policy as data: the versioned `policy.toml`, validated on load with errors that name the key.

Risk officers change limits, prices and eligibility by editing the file, never the code: a new product
is a new `[products.<name>]` table that reuses one of the exposure-base kinds below.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ScfriskError, describe_invalid
from core.files import read_toml
from core.schemas import CATEGORIES, MERCHANT_TYPES
from models.master_scale import MasterScale

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Amount = Annotated[float, Field(ge=0.0)]


class PolicyError(ScfriskError):
    """The policy file cannot be used or does not cover a request; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnsettledOrders(_Strict):
    """Confirmed orders the platform has not paid out yet: repaid from the settlement itself."""

    kind: Literal["unsettled_orders"]


class EligibleReceivables(_Strict):
    """Receivables not yet overdue, less the top buyer's share above the concentration cap."""

    kind: Literal["eligible_receivables"]
    max_counterparty_share: Rate


class WarehouseInventory(_Strict):
    """Appraised goods in a partner warehouse, cut by a haircut for the price volatility of their category."""

    kind: Literal["warehouse_inventory"]
    haircuts: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] = {}
    default_haircut: Annotated[float, Field(ge=0.0, lt=1.0)]

    @model_validator(mode="after")
    def _known_categories(self) -> WarehouseInventory:
        unknown = sorted(set(self.haircuts) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"haircuts: unknown categories {unknown}; known: {list(CATEGORIES)}")
        return self


class RevenueCapacity(_Strict):
    """Unsecured capacity: a number of months of average net sales."""

    kind: Literal["revenue_capacity"]
    months_of_sales: Annotated[float, Field(gt=0.0, le=12.0)]


ExposureBase = Annotated[
    UnsettledOrders | EligibleReceivables | WarehouseInventory | RevenueCapacity,
    Field(discriminator="kind"),
]


BASE_KINDS = tuple(
    get_args(m.model_fields["kind"].annotation)[0] for m in get_args(get_args(ExposureBase)[0])
)


class Pricing(_Strict):
    """Annual price components: the APR floor is funding + EL rate + operating + margin."""

    funding_rate: Rate
    operating_rate: Rate
    margin: Rate
    fee_rate: Rate = 0.0
    max_apr: Annotated[float, Field(gt=0.0, le=1.0)]


class ProductPolicy(_Strict):
    """Eligibility, limit and price terms of one product type."""

    segments: tuple[str, ...] = Field(min_length=1)
    min_tenure_days: Annotated[int, Field(ge=0)]
    min_net_sales_90d: Amount
    worst_grade: str
    advance_rate: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]]
    max_sales_share: Annotated[float, Field(gt=0.0)]
    max_limit: Annotated[float, Field(gt=0.0)]
    min_limit: Amount
    round_to: Annotated[float, Field(gt=0.0)]
    el_budget: Annotated[float, Field(gt=0.0)]
    lgd: Annotated[float, Field(gt=0.0, le=1.0)]
    ccf: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    tenor_days: Annotated[int, Field(gt=0)]
    pricing: Pricing
    base: ExposureBase

    @model_validator(mode="after")
    def _known_segments(self) -> ProductPolicy:
        unknown = sorted(set(self.segments) - set(MERCHANT_TYPES))
        if unknown:
            raise ValueError(f"segments: unknown {unknown}; known: {list(MERCHANT_TYPES)}")
        if self.min_limit > self.max_limit:
            raise ValueError(f"min_limit: {self.min_limit} exceeds max_limit {self.max_limit}")
        return self


class DecisionPolicy(_Strict):
    refer_ratio: Annotated[float, Field(ge=1.0)] = 2.0
    """Requests above this multiple of the limit go to an officer rather than getting a counter-offer."""


class CreditPolicy(_Strict):
    """The whole policy; `advance_rate` tables are checked against the master scale here."""

    version: str = Field(min_length=1)
    master_scale: MasterScale
    decision: DecisionPolicy = DecisionPolicy()
    products: dict[str, ProductPolicy] = Field(min_length=1)

    @model_validator(mode="after")
    def _grades_match_master_scale(self) -> CreditPolicy:
        names = self.master_scale.names
        for product, terms in self.products.items():
            key = f"products.{product}"
            if terms.worst_grade not in names:
                raise ValueError(
                    f"{key}.worst_grade: unknown grade '{terms.worst_grade}'; master scale: {names}"
                )
            eligible = names[: names.index(terms.worst_grade) + 1]
            if list(terms.advance_rate) != eligible:
                raise ValueError(
                    f"{key}.advance_rate: needs exactly the grades {eligible} (best to worst_grade, "
                    f"in order, no gap or overlap), got {list(terms.advance_rate)}"
                )
            rates = list(terms.advance_rate.values())
            if any(worse > better for better, worse in pairwise(rates)):
                raise ValueError(f"{key}.advance_rate: must not rise for worse grades, got {rates}")
        return self

    def product(self, name: str) -> ProductPolicy:
        """The terms of a product, or a `PolicyError` listing the products the policy knows."""
        try:
            return self.products[name]
        except KeyError:
            raise PolicyError(
                f"unknown product '{name}' in policy {self.version}; known: {', '.join(self.products)}"
            ) from None


def parse_policy(data: dict[str, Any], source: str = "policy") -> CreditPolicy:
    """Validate policy data; every problem is reported with its dotted key."""
    try:
        return CreditPolicy(**data)
    except ValidationError as exc:
        problems = describe_invalid(exc.errors(), BASE_KINDS)
        raise PolicyError(f"invalid credit policy {source}: {problems}") from exc


def load_policy(path: Path | str) -> CreditPolicy:
    """Read and validate the policy TOML file."""
    return parse_policy(read_toml(path, PolicyError, "policy file"), str(path))
