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
from features.definitions import FEATURE_INDEX
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


Action = Literal["watch", "freeze", "cut", "call_collateral", "escalate"]
"""What an early-warning alert does: `watch` puts the loan on the risk officers' watch list; `freeze` stops
new drawdowns of the loan's product (its limit becomes 0); `cut` lowers that limit by `cut_share`;
`call_collateral` asks the merchant to pledge more; `escalate` sends new requests to a credit officer."""
Share = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Signal(_Strict):
    """What every early-warning signal has: whether it runs and what it does when it fires."""

    enabled: bool = True
    action: Action
    cut_share: Share | None = None
    """Share of the limit a `cut` takes away (required with `cut`, refused otherwise)."""

    @model_validator(mode="after")
    def _cut_share_with_cut(self) -> _Signal:
        if self.action == "cut" and self.cut_share is None:
            raise ValueError("cut_share: required when action is 'cut' (the share of the limit taken away)")
        if self.action != "cut" and self.cut_share is not None:
            raise ValueError(f"cut_share: only a 'cut' takes a share, the action here is '{self.action}'")
        return self


class PdMigration(_Signal):
    """PD now against PD at origination (the same model on the application's point-in-time features)."""

    min_pd_ratio: Annotated[float, Field(gt=1.0)]
    min_grade_steps: Annotated[int, Field(ge=1)]
    min_pd_now: Rate = 0.0
    """Fires when the PD has multiplied by `min_pd_ratio`, the grade is `min_grade_steps` worse, AND the PD
    is now at least `min_pd_now` (a move from 0.2% to 0.5% is a migration, not a warning)."""


class SalesDrop(_Signal):
    """Net sales of the last 30 days against the merchant's own monthly level over the last 12 months."""

    max_ratio: Share
    min_monthly_level: Amount = 0.0
    """Merchants whose 12-month monthly level is below this are too small to compare."""


class Spike(_Signal):
    """A rate of the feature catalogue now against the same rate `baseline_days` earlier (its own history)."""

    feature: str
    baseline_days: Annotated[int, Field(ge=1, le=365)]
    multiple: Annotated[float, Field(gt=1.0)]
    min_value: Annotated[float, Field(ge=0.0)]
    """Fires when the rate is at least `min_value` AND at least `multiple` x its earlier level."""

    @model_validator(mode="after")
    def _known_feature(self) -> Spike:
        spec = FEATURE_INDEX.get(self.feature)
        if spec is None or spec.kind != "numeric":
            raise ValueError(f"feature: '{self.feature}' is not a numeric feature of the catalogue "
                             "(features/definitions.py, docs/features.md)")
        return self


class OverdueReceivables(_Signal):
    """Receivables owed to the merchant that are past due and unpaid."""

    min_share: Rate
    min_amount: Amount = 0.0


class DaysPastDue(_Signal):
    """The loan's days past due at its latest month-end observation."""

    min_days: Annotated[int, Field(ge=1)]


class CollateralReleased(_Signal):
    """Warehouse-receipt loans: goods that were in partner warehouses at disbursement and have left."""

    min_released_share: Share


class MarginCall(_Signal):
    """Warehouse-receipt loans: outstanding balance over the goods' value after the policy's haircut."""

    max_ltv: Annotated[float, Field(gt=0.0)]


class FinancedReceivableOverdue(_Signal):
    """Receivable financing: receivables open at disbursement (the financed pool) now past due."""

    min_overdue_share: Rate
    min_days_overdue: Annotated[int, Field(ge=1)] = 1


class MonitoringPolicy(_Strict):
    """Early warning on every live loan (`scfrisk monitor`): one table per signal; a signal left out does
    not run. Thresholds and actions are the risk officers' to set, like the rest of the policy."""

    pd_migration: PdMigration | None = None
    sales_drop: SalesDrop | None = None
    refund_spike: Spike | None = None
    complaint_spike: Spike | None = None
    shipping_delay: Spike | None = None
    overdue_receivables: OverdueReceivables | None = None
    days_past_due: DaysPastDue | None = None
    collateral_released: CollateralReleased | None = None
    margin_call: MarginCall | None = None
    financed_receivable_overdue: FinancedReceivableOverdue | None = None

    def signals(self) -> dict[str, _Signal]:
        """The enabled signals by name, in the order above."""
        configured = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: signal for name, signal in configured.items() if signal is not None and signal.enabled}


class CreditPolicy(_Strict):
    """The whole policy; `advance_rate` tables are checked against the master scale here."""

    version: str = Field(min_length=1)
    master_scale: MasterScale
    decision: DecisionPolicy = DecisionPolicy()
    products: dict[str, ProductPolicy] = Field(min_length=1)
    monitoring: MonitoringPolicy = MonitoringPolicy()

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
