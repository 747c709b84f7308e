"""Early warning on every live loan: the day's loan book in, one alert per loan and signal that fires out.

Pure: the caller (`pipelines.monitor`) assembles the book, one row per outstanding loan with what each
signal reads (the columns of `BOOK_COLUMNS`, merchant features now and `baseline_days` earlier, the PD now
and at origination by the same model, collateral figures), and this module applies the policy's
`[monitoring]` thresholds. Every alert carries its evidence (the figures that fired it), the action the
policy sets, and a sentence a risk officer or the merchant can read.

`limit_effects` turns a day's alerts into what the service does with new requests: a freeze sets the
product's limit to 0 (new drawdowns are declined), a cut lowers it by a share, an escalation sends requests
to an officer; `apply_effect` applies one merchant's effect to its limit-table rows and `decide_row`
(`credit.decision`) words the decision.

What the data model cannot say, and what stands in for it: no loan names the goods or receivables pledged
for it, so a warehouse-receipt loan's collateral is the merchant's goods in partner warehouses (what the
limit engine lends against) and a receivable-financing loan's financed pool is the receivables open and
not yet due at disbursement; goods are valued at their appraisal at receipt (there is no re-appraisal), so
a margin call comes from goods leaving the warehouse or a balance that grows, not from a fall in prices;
days past due are known at month ends only (`loan_performance`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from credit.policy import (
    CollateralReleased,
    CreditPolicy,
    DaysPastDue,
    FinancedReceivableOverdue,
    MarginCall,
    MonitoringPolicy,
    OverdueReceivables,
    PdMigration,
    SalesDrop,
    Spike,
    WarehouseInventory,
)
from features.definitions import FEATURE_INDEX, format_pair, format_value
from models.master_scale import MasterScale

BOOK_COLUMNS: tuple[str, ...] = (
    "loan_id", "merchant_id", "product", "principal", "disbursed_at", "outstanding", "days_past_due",
    "observed_at", "pd_now", "pd_origination", "category", "net_sales_30d", "net_sales_365d",
    "overdue_receivables", "receivables_overdue_share", "warehouse_value_at_disbursement", "warehouse_value_now",
    "financed_receivables", "financed_overdue", "financed_oldest_overdue_days",
)
"""What the book must hold besides each spike's baseline column (`baseline_column`)."""

ALERT_COLUMNS: tuple[str, ...] = (
    "as_of", "loan_id", "merchant_id", "product", "signal", "evidence", "action", "cut_share", "reason",
)
"""One row per alert; `evidence` is a JSON object of the figures that fired it (`EVIDENCE` names them)."""

EVIDENCE: dict[str, tuple[str, str]] = {
    "pd_now": ("PD now", "ratio_pct"),
    "pd_origination": ("PD at origination", "ratio_pct"),
    "grade_now": ("Grade now", "category"),
    "grade_origination": ("Grade at origination", "category"),
    "monthly_sales_level_12m": ("Monthly net sales, average of the last 12 months", "CNY"),
    "sales_ratio": ("Last 30 days' net sales over the 12-month monthly level", "ratio"),
    "baseline": ("The same rate at the earlier date", "ratio"),
    "baseline_days": ("Days earlier the rate is compared with", "days"),
    "days_past_due": ("Days past due at the latest month end", "days"),
    "observed_at": ("Month end of that observation", "category"),
    "outstanding": ("Outstanding balance of the loan", "CNY"),
    "warehouse_value_at_disbursement": ("Goods in partner warehouses at disbursement (appraised)", "CNY"),
    "warehouse_value_now": ("Goods in partner warehouses now (appraised)", "CNY"),
    "released_share": ("Share of the goods at disbursement released since", "ratio"),
    "haircut": ("Haircut of the goods' category (policy)", "ratio"),
    "ltv": ("Outstanding over the goods' value after the haircut (loan to value)", "ratio"),
    "financed_receivables": ("Receivables open and not yet due at disbursement (the financed pool)", "CNY"),
    "financed_overdue": ("Of those, unpaid and past due now", "CNY"),
    "financed_oldest_overdue_days": ("Days the oldest of them is past due", "days"),
}
"""Label and unit of every evidence figure that is not a feature of the catalogue (those read as
`docs/features.md` words them)."""

ACTION_WORDS: dict[str, str] = {
    "watch": "put on the watch list",
    "freeze": "freeze the undrawn {product} limit",
    "cut": "cut the {product} limit by {share:.0%}",
    "call_collateral": "call for more collateral on the {product} loan",
    "escalate": "escalate to a credit officer: new {product} requests are referred",
}


def _plain(product: str) -> str:
    return product.replace("_", " ")


def action_text(action: str, product: str, cut_share: float | None = None) -> str:
    """The action of an alert in plain words."""
    share = 0.0 if cut_share is None or (isinstance(cut_share, float) and math.isnan(cut_share)) else cut_share
    return ACTION_WORDS[action].format(product=_plain(product), share=share)


def evidence_label(name: str) -> tuple[str, str]:
    """(label, unit) of an evidence figure: the catalogue's description for a feature, else `EVIDENCE`."""
    spec = FEATURE_INDEX.get(name)
    if spec is not None:
        return spec.description.rstrip("."), spec.unit
    return EVIDENCE.get(name, (name.replace("_", " "), "number"))


def evidence_text(name: str, value: Any) -> str:
    """An evidence figure as a risk officer reads it ('18%', 'CNY 1,235', '35 days')."""
    _, unit = evidence_label(name)
    if unit == "ratio_pct":
        return "unknown" if value is None else f"{float(value):.2%}"
    return format_value(value, unit)


def baseline_column(feature: str, days: int) -> str:
    """The book column of a feature's value `days` before the as-of time."""
    return f"{feature}@-{days}d"


def baselines(policy: MonitoringPolicy) -> dict[int, list[str]]:
    """The features the enabled spike signals compare with their earlier values, by days earlier."""
    out: dict[int, list[str]] = {}
    for signal in policy.signals().values():
        if isinstance(signal, Spike):
            out.setdefault(signal.baseline_days, []).append(signal.feature)
    return out


def _money(value: float) -> str:
    return f"CNY {value:,.0f}"


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _fired(book: pd.DataFrame, mask: np.ndarray, signal: str, config: Any, evidence: list[dict[str, Any]],
           reasons: list[str]) -> pd.DataFrame:
    rows = book.loc[mask]
    return pd.DataFrame({
        "loan_id": rows["loan_id"].to_numpy(),
        "merchant_id": rows["merchant_id"].to_numpy(),
        "product": rows["product"].to_numpy(),
        "signal": signal,
        "evidence": [json.dumps(e, sort_keys=True) for e in evidence],
        "action": config.action,
        "cut_share": np.nan if config.cut_share is None else config.cut_share,
        "reason": reasons,
    })


def _pd_migration(book: pd.DataFrame, config: PdMigration, scale: MasterScale) -> pd.DataFrame:
    now, then = book["pd_now"].to_numpy(float), book["pd_origination"].to_numpy(float)
    known = np.isfinite(now) & np.isfinite(then) & (then > 0)
    grade_now = scale.grade_index(np.where(known, now, 0.0))
    grade_then = scale.grade_index(np.where(known, then, 0.0))
    steps = grade_now - grade_then
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = now / then
    mask = known & (ratio >= config.min_pd_ratio) & (steps >= config.min_grade_steps) & (now >= config.min_pd_now)
    names = np.array(scale.names)
    evidence, reasons = [], []
    for p_now, p_then, g_now, g_then, k in zip(now[mask], then[mask], names[grade_now[mask]],
                                                names[grade_then[mask]], steps[mask]):
        evidence.append({"pd_now": p_now, "pd_origination": p_then, "grade_now": g_now,
                         "grade_origination": g_then})
        reasons.append(f"the PD rose from {p_then:.2%} (grade {g_then}) at origination to {p_now:.2%} "
                       f"(grade {g_now}) now, {k} grade{'s' if k > 1 else ''} worse")
    return _fired(book, mask, "pd_migration", config, evidence, reasons)


def _sales_drop(book: pd.DataFrame, config: SalesDrop) -> pd.DataFrame:
    last = book["net_sales_30d"].to_numpy(float)
    level = book["net_sales_365d"].to_numpy(float) / 12.0
    known = np.isfinite(last) & np.isfinite(level) & (level > 0) & (level >= config.min_monthly_level)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = last / level
    mask = known & (ratio <= config.max_ratio)
    evidence = [{"net_sales_30d": s, "monthly_sales_level_12m": lv, "sales_ratio": r}
                for s, lv, r in zip(last[mask], level[mask], ratio[mask])]
    reasons = [f"net sales of the last 30 days ({_money(s)}) are {r:.0%} of the merchant's own monthly level "
               f"over the last 12 months ({_money(lv)}), at or below the {config.max_ratio:.0%} the policy "
               "tolerates" for s, lv, r in zip(last[mask], level[mask], ratio[mask])]
    return _fired(book, mask, "sales_drop", config, evidence, reasons)


SPIKE_WORDS = {"refund_spike": "refunds spiked", "complaint_spike": "complaints spiked",
               "shipping_delay": "shipping delays spiked"}


def _spike(book: pd.DataFrame, signal: str, config: Spike) -> pd.DataFrame:
    now = book[config.feature].to_numpy(float)
    before = book[baseline_column(config.feature, config.baseline_days)].to_numpy(float)
    before_or_zero = np.nan_to_num(before, nan=0.0)  # no earlier activity: any rate above the floor is new
    mask = np.isfinite(now) & (now >= config.min_value) & (now >= config.multiple * before_or_zero)
    label, unit = evidence_label(config.feature)
    evidence = [{config.feature: v, "baseline": None if math.isnan(b) else b, "baseline_days": config.baseline_days}
                for v, b in zip(now[mask], before[mask])]
    words = SPIKE_WORDS.get(signal, signal.replace("_", " "))
    reasons = [f"{words}: {label.lower()} is {', against '.join(format_pair(v, b, unit))} "
               f"{config.baseline_days} days earlier (the policy's threshold: {config.multiple:g}x and at least "
               f"{format_value(config.min_value, unit)})" for v, b in zip(now[mask], before[mask])]
    return _fired(book, mask, signal, config, evidence, reasons)


def _overdue_receivables(book: pd.DataFrame, config: OverdueReceivables) -> pd.DataFrame:
    amount = np.nan_to_num(book["overdue_receivables"].to_numpy(float))
    share = np.nan_to_num(book["receivables_overdue_share"].to_numpy(float))
    mask = (amount > 0) & (amount >= config.min_amount) & (share >= config.min_share)
    evidence = [{"overdue_receivables": a, "receivables_overdue_share": s} for a, s in zip(amount[mask], share[mask])]
    reasons = [f"{_money(a)} of the receivables owed to the merchant are past due and unpaid, {s:.0%} of its "
               "unpaid receivables: its buyers are not paying" for a, s in zip(amount[mask], share[mask])]
    return _fired(book, mask, "overdue_receivables", config, evidence, reasons)


def _days_past_due(book: pd.DataFrame, config: DaysPastDue) -> pd.DataFrame:
    dpd = np.nan_to_num(book["days_past_due"].to_numpy(float))
    mask = dpd >= config.min_days
    rows = book.loc[mask]
    evidence, reasons = [], []
    for d, at, out in zip(dpd[mask], rows["observed_at"], rows["outstanding"]):
        day = f"{pd.Timestamp(at):%Y-%m-%d}"
        evidence.append({"days_past_due": int(d), "observed_at": day, "outstanding": _number(out)})
        reasons.append(f"the loan was {int(d)} days past due at the month end of {day}, with "
                       f"{_money(_number(out))} outstanding")
    return _fired(book, mask, "days_past_due", config, evidence, reasons)


def _warehouse_loans(book: pd.DataFrame, policy: CreditPolicy) -> np.ndarray:
    kinds = {name: terms.base for name, terms in policy.products.items()}
    return book["product"].map(lambda p: isinstance(kinds.get(p), WarehouseInventory)).to_numpy(bool)


def _collateral_released(book: pd.DataFrame, config: CollateralReleased, policy: CreditPolicy) -> pd.DataFrame:
    then = book["warehouse_value_at_disbursement"].to_numpy(float)
    now = np.nan_to_num(book["warehouse_value_now"].to_numpy(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        released = np.clip(1.0 - now / then, 0.0, 1.0)
    mask = _warehouse_loans(book, policy) & (then > 0) & (released >= config.min_released_share)
    evidence = [{"warehouse_value_at_disbursement": t, "warehouse_value_now": n, "released_share": r}
                for t, n, r in zip(then[mask], now[mask], released[mask])]
    reasons = [f"{r:.0%} of the goods pledged in partner warehouses at disbursement ({_money(t)}) have been "
               f"released without replacement; {_money(n)} remain"
               for t, n, r in zip(then[mask], now[mask], released[mask])]
    return _fired(book, mask, "collateral_released", config, evidence, reasons)


def _haircuts(book: pd.DataFrame, policy: CreditPolicy) -> np.ndarray:
    def cut(product: str, category: str) -> float:
        base = policy.products[product].base if product in policy.products else None
        if not isinstance(base, WarehouseInventory):
            return float("nan")
        return base.haircuts.get(category, base.default_haircut)

    return np.array([cut(p, c) for p, c in zip(book["product"], book["category"])], dtype=float)


def _margin_call(book: pd.DataFrame, config: MarginCall, policy: CreditPolicy) -> pd.DataFrame:
    outstanding = np.nan_to_num(book["outstanding"].to_numpy(float))
    value = np.nan_to_num(book["warehouse_value_now"].to_numpy(float))
    haircut = _haircuts(book, policy)
    lendable = value * (1.0 - np.nan_to_num(haircut))
    with np.errstate(divide="ignore", invalid="ignore"):
        ltv = np.where(lendable > 0, outstanding / lendable, np.inf)
    mask = _warehouse_loans(book, policy) & (outstanding > 0) & (ltv > config.max_ltv)
    evidence, reasons = [], []
    for out, v, h, r in zip(outstanding[mask], value[mask], haircut[mask], ltv[mask]):
        evidence.append({"outstanding": out, "warehouse_value_now": v, "haircut": h,
                         "ltv": None if math.isinf(r) else r})
        cover = f"{r:.0%} of" if math.isfinite(r) else "not covered by"
        reasons.append(f"the outstanding {_money(out)} is {cover} the goods in partner warehouses after the "
                       f"{h:.0%} haircut ({_money(v * (1 - h))}), above the {config.max_ltv:.0%} maximum loan to "
                       "value: margin call")
    return _fired(book, mask, "margin_call", config, evidence, reasons)


def _financed_receivable_overdue(book: pd.DataFrame, config: FinancedReceivableOverdue,
                                 policy: CreditPolicy) -> pd.DataFrame:
    kinds = {name: terms.base.kind for name, terms in policy.products.items()}
    receivable_loans = book["product"].map(kinds).eq("eligible_receivables").to_numpy(bool)
    pool = book["financed_receivables"].to_numpy(float)
    overdue = np.nan_to_num(book["financed_overdue"].to_numpy(float))
    oldest = np.nan_to_num(book["financed_oldest_overdue_days"].to_numpy(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = overdue / pool
    mask = (receivable_loans & (pool > 0) & (overdue > 0) & (share >= config.min_overdue_share)
            & (oldest >= config.min_days_overdue))
    evidence = [{"financed_receivables": p, "financed_overdue": o, "financed_oldest_overdue_days": int(d)}
                for p, o, d in zip(pool[mask], overdue[mask], oldest[mask])]
    reasons = [f"{_money(o)} of the receivables financed at disbursement ({_money(p)}, {o / p:.0%}) are past due "
               f"and unpaid, the oldest by {int(d)} days" for p, o, d in zip(pool[mask], overdue[mask], oldest[mask])]
    return _fired(book, mask, "financed_receivable_overdue", config, evidence, reasons)


def check_book(book: pd.DataFrame, policy: MonitoringPolicy) -> None:
    """Refuse a book that lacks a column a signal reads: a missing column must not read as 'no alert'."""
    needed = [*BOOK_COLUMNS, *(baseline_column(f, d) for d, names in baselines(policy).items() for f in names),
              *(s.feature for s in policy.signals().values() if isinstance(s, Spike))]
    missing = sorted(set(needed) - set(book.columns))
    if missing:
        raise ValueError(f"loan book misses columns {missing}")


def early_warnings(book: pd.DataFrame, policy: CreditPolicy, as_of: datetime) -> pd.DataFrame:
    """Every alert of the day: one row per loan of `book` and enabled signal that fires (`ALERT_COLUMNS`),
    ordered by merchant, loan and the signal's place in the policy."""
    monitoring = policy.monitoring
    check_book(book, monitoring)
    book = book.reset_index(drop=True)
    parts = []
    for name, config in monitoring.signals().items():
        match config:
            case PdMigration():
                parts.append(_pd_migration(book, config, policy.master_scale))
            case SalesDrop():
                parts.append(_sales_drop(book, config))
            case Spike():
                parts.append(_spike(book, name, config))
            case OverdueReceivables():
                parts.append(_overdue_receivables(book, config))
            case DaysPastDue():
                parts.append(_days_past_due(book, config))
            case CollateralReleased():
                parts.append(_collateral_released(book, config, policy))
            case MarginCall():
                parts.append(_margin_call(book, config, policy))
            case FinancedReceivableOverdue():
                parts.append(_financed_receivable_overdue(book, config, policy))
    order = {name: i for i, name in enumerate(monitoring.signals())}
    fired = [p for p in parts if len(p)]
    alerts = pd.concat(fired, ignore_index=True) if fired else pd.DataFrame(
        {"loan_id": pd.Series(dtype="int64"), "merchant_id": pd.Series(dtype=str), "product": pd.Series(dtype=str),
         "signal": pd.Series(dtype=str), "evidence": pd.Series(dtype=str), "action": pd.Series(dtype=str),
         "cut_share": pd.Series(dtype=float), "reason": pd.Series(dtype=str)})
    alerts.insert(0, "as_of", pd.Timestamp(as_of).floor("us"))
    alerts = alerts.assign(_order=alerts["signal"].map(order)).sort_values(["merchant_id", "loan_id", "_order"])
    return alerts.drop(columns="_order").reset_index(drop=True)[list(ALERT_COLUMNS)]


# --- what the service does with the day's alerts ------------------------------------------------------------


@dataclass(frozen=True)
class LimitEffect:
    """What a merchant's alerts do to one product's limit: the strongest of each kind, with its reasons."""

    frozen: bool
    escalated: bool
    cut_share: float
    reasons: tuple[tuple[str, str], ...]
    """(code, sentences) per action that acts, e.g. ('monitoring.freeze', ...): one entry per code, so an audit
    line's reasons keyed by code keep every alert's sentence."""


LIMIT_ACTIONS = ("freeze", "cut", "escalate")
"""The actions that change what the service offers; `watch` and `call_collateral` are for the officers."""


def limit_effects(alerts: pd.DataFrame) -> dict[str, dict[str, LimitEffect]]:
    """Per merchant and product, the effect of the alerts that change limits (`LIMIT_ACTIONS`).

    Plain tuples, not a pandas group per (merchant, product): the service builds this at every bundle load
    and a live book's day has tens of thousands of alerts."""
    acting = alerts[alerts["action"].isin(LIMIT_ACTIONS)].sort_values(["merchant_id", "product"], kind="stable")
    grouped: dict[tuple[str, str], list[tuple[str, str, str, Any, float]]] = {}
    for merchant, product, action, reason, signal, at, share in zip(
            acting["merchant_id"], acting["product"], acting["action"], acting["reason"], acting["signal"],
            acting["as_of"], acting["cut_share"], strict=True):
        grouped.setdefault((str(merchant), str(product)), []).append((action, reason, signal, at, share))
    out: dict[str, dict[str, LimitEffect]] = {}
    for (merchant, product), group in grouped.items():
        sentences: dict[str, list[str]] = {}
        for action, reason, signal, at, share in group:
            sentences.setdefault(f"monitoring.{action}", []).append(
                f"{reason} ({signal.replace('_', ' ')} alert of {pd.Timestamp(at):%Y-%m-%d}: "
                f"{action_text(action, product, share)})")
        reasons = tuple((code, "; ".join(dict.fromkeys(texts))) for code, texts in sentences.items())
        actions = {action for action, *_ in group}
        cuts = [float(share) for action, *_, share in group if action == "cut" and not math.isnan(share)]
        out.setdefault(merchant, {})[product] = LimitEffect(
            frozen="freeze" in actions, escalated="escalate" in actions,
            cut_share=max(cuts) if cuts else 0.0, reasons=reasons)
    return out


def apply_effect(row: Mapping[str, Any], effect: LimitEffect | None, policy: CreditPolicy) -> dict[str, Any]:
    """A limit-table row with a merchant's monitoring effect applied: a freeze makes the limit 0, a cut
    lowers it by its share (rounded down to the product's step); `monitoring_action` and
    `monitoring_reasons` say which applies and why (None and [] when none does)."""
    out = dict(row)
    out["monitoring_action"], out["monitoring_reasons"] = None, []
    if effect is None:
        return out
    terms = policy.product(str(row["product"]))
    limit = float(row["limit"])
    if effect.frozen:
        action, limit = "freeze", 0.0
    elif effect.escalated:
        action = "escalate"
    else:
        action = "cut"
    if effect.cut_share and not effect.frozen:
        limit = math.floor(limit * (1.0 - effect.cut_share) / terms.round_to) * terms.round_to
    if row["eligible"]:
        out["limit"] = limit
        out["ead"] = limit * terms.ccf
        out["expected_loss"] = float(row["pd"]) * terms.lgd * out["ead"]
    out["monitoring_action"] = action
    out["monitoring_reasons"] = [{"code": code, "description": text} for code, text in effect.reasons]
    return out
