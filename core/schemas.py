"""The platform's data model: every raw table, its columns, keys and rules, in one place.

The simulator writes these tables, ingestion validates against them (the Great Expectations suites are
built from these specs), the raw store partitions them, and `docs/data.md` is generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

PRODUCTS: tuple[str, ...] = (
    "order_financing",
    "receivable_financing",
    "warehouse_receipt_financing",
    "microloan",
)
MERCHANT_TYPES: tuple[str, ...] = ("corporate", "individual")
CATEGORIES: tuple[str, ...] = (
    "apparel",
    "electronics",
    "home",
    "beauty",
    "food",
    "sports",
    "toys",
    "auto_parts",
)
REGIONS: tuple[str, ...] = ("east", "north", "south", "west", "central")
ORDER_STATUSES: tuple[str, ...] = ("paid", "shipped", "delivered", "completed", "cancelled", "refunded")
EVENT_TYPES: tuple[str, ...] = ("login", "listing_change", "price_change", "complaint", "cs_response")

TIMESTAMP = pa.timestamp("us")
UPDATED_AT = "updated_at"
"""When a row that changes state after it is written (`TableSpec.state_columns`) last changed."""
CHANGED_AT = "changed_at"
"""A batch's key index: when each delivered row last changed (`TableSpec.changed_at`)."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    description: str
    nullable: bool = False
    allowed: tuple[str, ...] | None = None
    min_value: float | None = None
    max_value: float | None = None
    scheduled: bool = False
    """A planned date (due, maturity, promised delivery): may lie in the future, unlike a fact's time."""
    optional: bool = False
    """May be absent from a batch (one delivered before the column existed): read as all empty."""


@dataclass(frozen=True)
class ForeignKey:
    column: str
    table: str
    ref_column: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    description: str
    columns: tuple[Column, ...]
    key: str
    time_column: str
    """The fact's own timestamp: partitions the raw store by month and must not lie in the future."""
    foreign_keys: tuple[ForeignKey, ...] = ()
    ordered: tuple[tuple[str, str], ...] = ()
    """Pairs (earlier, later): when both are set, `later` must not precede `earlier`."""
    column_index: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_index", {c.name: c for c in self.columns})

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns])

    @property
    def timestamp_columns(self) -> list[str]:
        return [c.name for c in self.columns if pa.types.is_timestamp(c.type)]

    @property
    def state_columns(self) -> list[str]:
        """When each later state change happened (shipped, refunded, paid, released...): a row's facts that
        are empty when it is first written and set afterwards. Only tables with `updated_at` have them."""
        if UPDATED_AT not in self.column_index:
            return []
        return [
            c.name for c in self.columns
            if pa.types.is_timestamp(c.type) and c.nullable and not c.scheduled and c.name != UPDATED_AT
        ]

    @property
    def change_column(self) -> str:
        """The column an incremental pull keeps its watermark on: `updated_at` where rows change after they
        are written (empty there means never changed, i.e. the time column), else the time column."""
        return UPDATED_AT if UPDATED_AT in self.column_index else self.time_column

    def changed_at(self, rows: pa.Table | pa.RecordBatch) -> pa.Array | pa.ChunkedArray:
        """When each row last changed: the latest of its time, its state changes and `updated_at` (which a
        pull sets, and a file may leave out). Of two deliveries of one key, the later is the row's state.
        Empty for a table whose rows do not change state (no `updated_at`: a re-delivery is a correction) and
        where the batch's time is not a timestamp (its rules reject it)."""
        names = rows.schema.names
        if UPDATED_AT not in self.column_index or not _typed(rows, self.time_column):
            return pa.nulls(rows.num_rows, TIMESTAMP)
        times = [rows.column(c) for c in (self.time_column, *self.state_columns, UPDATED_AT)
                 if c in names and _typed(rows, c)]
        return pc.max_element_wise(*times, skip_nulls=True) if len(times) > 1 else times[0]


def _typed(rows: pa.Table | pa.RecordBatch, column: str) -> bool:
    return column in rows.schema.names and rows.schema.field(column).type == TIMESTAMP


def conform(table: pa.Table, spec: TableSpec, from_text: bool = False) -> pa.Table:
    """Cast columns to their schema types where that is lossless, in schema order, extras last.

    Text (CSV) is parsed into any type; typed (Parquet) columns only change width or unit. A column that
    will not cast is left as delivered so the type expectation reports it with the delivered type. An
    absent optional column is added empty, so batches from before it existed still load.
    """
    for col in spec.columns:
        if col.optional and col.name not in table.column_names:
            table = table.append_column(pa.field(col.name, col.type), pa.nulls(table.num_rows, col.type))
    columns: dict[str, pa.ChunkedArray] = {}
    extras = [n for n in table.column_names if n not in spec.column_index]
    for name in [c.name for c in spec.columns if c.name in table.column_names] + extras:
        column = table.column(name)
        col = spec.column_index.get(name)
        if col is not None and column.type != col.type and (from_text or _same_family(column.type, col.type)):
            try:
                column = pc.cast(column, col.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
        columns[name] = column
    return pa.table(columns)


def _same_family(actual: pa.DataType, expected: pa.DataType) -> bool:
    families = (pa.types.is_integer, pa.types.is_floating, pa.types.is_timestamp, _is_text)
    return any(f(actual) and f(expected) for f in families) or (
        pa.types.is_integer(actual) and pa.types.is_floating(expected)
    )


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _updated_at(time_column: str) -> Column:
    return Column(
        UPDATED_AT,
        TIMESTAMP,
        f"When the row last changed: `{time_column}` when written, then each later state change. Empty or "
        f"absent (batches from before this column) reads as never changed, i.e. `{time_column}`.",
        nullable=True,
        optional=True,
    )


def _changes(time_column: str, *states: str) -> tuple[tuple[str, str], ...]:
    """`updated_at` is not before the row's time nor any state change: a pull by watermark sees every change."""
    return tuple((earlier, UPDATED_AT) for earlier in (time_column, *states))


def _id(name: str, what: str) -> Column:
    return Column(name, pa.string() if name == "merchant_id" else pa.int64(), what)


def _money(name: str, what: str, nullable: bool = False) -> Column:
    return Column(name, pa.float64(), what, nullable=nullable, min_value=0.0)


def _ts(name: str, what: str, nullable: bool = False, scheduled: bool = False) -> Column:
    return Column(name, TIMESTAMP, what, nullable=nullable, scheduled=scheduled)


_MERCHANT_FK = ForeignKey("merchant_id", "merchants", "merchant_id")

MERCHANTS = TableSpec(
    name="merchants",
    description="One row per merchant selling on the platform.",
    key="merchant_id",
    time_column="onboarded_at",
    columns=(
        _id("merchant_id", "Merchant identifier, e.g. `M0000042`."),
        Column("merchant_type", pa.string(), "Legal form: corporate or individual.", allowed=MERCHANT_TYPES),
        Column("category", pa.string(), "Main product category sold.", allowed=CATEGORIES),
        Column("region", pa.string(), "Region of registration.", allowed=REGIONS),
        _ts("onboarded_at", "When the merchant opened its shop on the platform."),
        _money("registered_capital", "Registered capital (corporate merchants only).", nullable=True),
    ),
)

ORDERS = TableSpec(
    name="orders",
    description=(
        "One row per customer order. Status is the order's latest state; every state change has its "
        "own timestamp, which is what point-in-time features must use."
    ),
    key="order_id",
    time_column="ordered_at",
    foreign_keys=(_MERCHANT_FK,),
    ordered=(
        ("ordered_at", "shipped_at"),
        ("ordered_at", "delivered_at"),
        ("shipped_at", "delivered_at"),
        ("ordered_at", "cancelled_at"),
        ("ordered_at", "refunded_at"),
        ("delivered_at", "rated_at"),
        ("ordered_at", "settled_at"),
        *_changes("ordered_at", "shipped_at", "delivered_at", "cancelled_at", "refunded_at", "rated_at",
                  "settled_at"),
    ),
    columns=(
        _id("order_id", "Order identifier."),
        _id("merchant_id", "Selling merchant."),
        Column("buyer_id", pa.int64(), "Buying customer."),
        _ts("ordered_at", "When the order was paid by the buyer."),
        _money("amount", "Order value paid by the buyer."),
        Column("status", pa.string(), "Latest status of the order.", allowed=ORDER_STATUSES),
        _ts("promised_delivery_at", "Delivery date promised to the buyer.", scheduled=True),
        _ts("shipped_at", "When the merchant shipped it.", nullable=True),
        _ts("delivered_at", "When it reached the buyer.", nullable=True),
        _ts("cancelled_at", "When it was cancelled (before shipping).", nullable=True),
        _ts("refunded_at", "When it was refunded (after delivery).", nullable=True),
        Column("rating", pa.int8(), "Buyer's rating 1-5.", nullable=True, min_value=1, max_value=5),
        _ts("rated_at", "When the buyer rated it.", nullable=True),
        _ts("settled_at", "When the platform paid the order value out to the merchant.", nullable=True),
        _updated_at("ordered_at"),
    ),
)

BEHAVIOUR_EVENTS = TableSpec(
    name="behaviour_events",
    description="Merchant activity on the platform: logins, listing and price changes, complaints, service.",
    key="event_id",
    time_column="event_at",
    foreign_keys=(_MERCHANT_FK,),
    columns=(
        _id("event_id", "Event identifier."),
        _id("merchant_id", "Merchant concerned."),
        _ts("event_at", "When the event happened."),
        Column("event_type", pa.string(), "Kind of event.", allowed=EVENT_TYPES),
        Column(
            "value",
            pa.float64(),
            "Response time in minutes for `cs_response`; empty otherwise.",
            nullable=True,
            min_value=0.0,
        ),
    ),
)

INVENTORY_RECEIPTS = TableSpec(
    name="inventory_receipts",
    description="Goods deposited in a partner warehouse (warehouse receipts), appraised at receipt.",
    key="receipt_id",
    time_column="received_at",
    foreign_keys=(_MERCHANT_FK,),
    ordered=(("received_at", "released_at"), *_changes("received_at", "released_at")),
    columns=(
        _id("receipt_id", "Warehouse receipt identifier."),
        _id("merchant_id", "Merchant owning the goods."),
        Column("warehouse_id", pa.string(), "Partner warehouse."),
        Column("category", pa.string(), "Category of the goods.", allowed=CATEGORIES),
        Column("quantity", pa.int64(), "Units received.", min_value=0),
        _money("appraised_value", "Appraised value of the goods at receipt."),
        _ts("received_at", "When the goods entered the warehouse."),
        _ts("released_at", "When the goods left the warehouse (sold or withdrawn).", nullable=True),
        _updated_at("received_at"),
    ),
)

RECEIVABLES = TableSpec(
    name="receivables",
    description="Amounts owed to the merchant by business buyers or the platform, with due and paid dates.",
    key="receivable_id",
    time_column="issued_at",
    foreign_keys=(_MERCHANT_FK,),
    ordered=(("issued_at", "due_at"), ("issued_at", "paid_at"), *_changes("issued_at", "paid_at")),
    columns=(
        _id("receivable_id", "Receivable identifier."),
        _id("merchant_id", "Merchant owed the money."),
        Column("counterparty_id", pa.string(), "Who owes it: a business buyer or `platform`."),
        _money("amount", "Amount owed."),
        _ts("issued_at", "When the invoice was issued."),
        _ts("due_at", "When payment is due.", scheduled=True),
        _ts("paid_at", "When it was paid; empty while unpaid.", nullable=True),
        _updated_at("issued_at"),
    ),
)

LOAN_APPLICATIONS = TableSpec(
    name="loan_applications",
    description="Every credit application a merchant made, for one of the four products.",
    key="application_id",
    time_column="applied_at",
    foreign_keys=(_MERCHANT_FK,),
    columns=(
        _id("application_id", "Application identifier."),
        _id("merchant_id", "Applying merchant."),
        Column("product", pa.string(), "Product applied for.", allowed=PRODUCTS),
        _money("requested_amount", "Amount requested."),
        _ts("applied_at", "When the application was made (the as-of time of its features)."),
    ),
)

LOANS = TableSpec(
    name="loans",
    description="Loans disbursed on approved applications.",
    key="loan_id",
    time_column="disbursed_at",
    foreign_keys=(
        _MERCHANT_FK,
        ForeignKey("application_id", "loan_applications", "application_id"),
    ),
    ordered=(("disbursed_at", "maturity_at"),),
    columns=(
        _id("loan_id", "Loan identifier."),
        _id("application_id", "Application it was granted on."),
        _id("merchant_id", "Borrowing merchant."),
        Column("product", pa.string(), "Product.", allowed=PRODUCTS),
        _money("principal", "Amount disbursed."),
        Column("annual_rate", pa.float64(), "Annual interest rate charged.", min_value=0.0, max_value=1.0),
        _ts("disbursed_at", "When the money was paid out."),
        _ts("maturity_at", "When the loan is due in full.", scheduled=True),
    ),
)

LOAN_PERFORMANCE = TableSpec(
    name="loan_performance",
    description=(
        "Month-end repayment status of every open loan: days past due and outstanding balance. "
        "Default is 90+ days past due within 12 months of disbursement."
    ),
    key="record_id",
    time_column="observed_at",
    foreign_keys=(_MERCHANT_FK, ForeignKey("loan_id", "loans", "loan_id")),
    columns=(
        _id("record_id", "Row identifier."),
        _id("loan_id", "Loan observed."),
        _id("merchant_id", "Borrowing merchant."),
        _ts("observed_at", "Month end of the observation."),
        Column("days_past_due", pa.int32(), "Days the oldest unpaid instalment is overdue.", min_value=0),
        _money("outstanding", "Outstanding balance."),
    ),
)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        MERCHANTS,
        ORDERS,
        BEHAVIOUR_EVENTS,
        INVENTORY_RECEIPTS,
        RECEIVABLES,
        LOAN_APPLICATIONS,
        LOANS,
        LOAN_PERFORMANCE,
    )
}
"""All raw tables in dependency order: a table's foreign keys point only to tables before it."""


def table(name: str) -> TableSpec:
    """The spec of a raw table, or a clear error listing the known ones."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table '{name}'; known tables: {', '.join(TABLES)}") from None


_LABELLED = ("merchants", "orders", "loan_applications", "loans", "loan_performance")
STAGE_TABLES: dict[str, tuple[str, ...]] = {
    "features": ("merchants", "orders"),
    "train": _LABELLED,
    "limits": _LABELLED,
    "run": _LABELLED,
    "refresh": ("merchants", "orders"),
    "monitor": _LABELLED,
}
"""The raw tables each stage cannot do without, in the raw store or in the batch it ingests first.

Features need the merchants and their orders (the monthly snapshots follow the orders' months); the other
activity tables may be missing, and the features built from them are then empty. Training labels each
loan from `loan_applications`, `loans` and `loan_performance` (90+ days past due within the horizon);
limits score the same labelled loans for their out-of-time backtest, and `run` does all of it; `monitor` reads
the live loans with their repayment records and applications (the PD at origination). The daily `refresh`
computes features and scores them with the champion trained before."""
