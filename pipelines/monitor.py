"""`scfrisk monitor`: the daily early warning on every live loan, published with the live bundle.

Thin glue around `credit.monitoring`: the raw store gives the day's live loans, their latest month-end
repayment status and collateral figures (DuckDB), the feature store's SQL the merchants' features now, at
each spike's baseline and at each loan's application (point in time), each query only the features its part
reads, and the live bundle's model the PD now and at origination (kept from one day to the next,
`pipelines.origination`). The alerts go to `$SCFRISK_HOME/monitor/as_of=<day>/` (table and watch-list page)
and into a new bundle (the live one's parts plus the alerts), so the service applies the day's freezes and
cuts as soon as it is live. A failed run publishes nothing; the live bundle stays live.

`scfrisk refresh` runs the same watch (`watch`) as a step of the day, on the day's raw store with the
champion it re-scores with, and publishes the alerts in the day's bundle: the alerts follow the fresh
features and limits, and no bundle carries the previous day's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
from prefect import flow

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import Settings
from core.sql import fetch_one
from credit.monitoring import baseline_column, baselines, early_warnings
from credit.policy import CreditPolicy, load_policy
from features.definitions import MONEY, feature_set_version, with_inputs
from features.training_set import get_training_set, table_readers
from models.pd_model import PDModel
from pipelines.origination import cached_origination_pd, origination_pd
from pipelines.publish import BundleParts, publish
from reporting.watch_list import write_watch_list
from serving.bundle import (
    FEATURES_FILE,
    LIMITS_FILE,
    MODEL_DIR,
    REPORT_FILE,
    Bundle,
    bundle_path,
    current_bundle_id,
    load_bundle,
)

log = logging.getLogger(__name__)

MERCHANT_FEATURES = ("category", "net_sales_30d", "net_sales_365d", "overdue_receivables", "receivables_overdue_share")
"""Merchant features every book row carries (the spikes add theirs)."""

LIVE_LOANS = """
WITH latest AS (
    SELECT loan_id, max(observed_at) AS observed_at, arg_max(days_past_due, observed_at) AS days_past_due,
           arg_max(outstanding, observed_at) AS outstanding
    FROM loan_performance WHERE observed_at < $as_of GROUP BY loan_id
)
SELECT l.loan_id, l.merchant_id, l.product, l.principal, l.disbursed_at, l.maturity_at, a.applied_at,
       coalesce(p.days_past_due, 0) AS days_past_due, coalesce(p.outstanding, l.principal) AS outstanding,
       p.observed_at
FROM loans l JOIN loan_applications a ON a.application_id = l.application_id
LEFT JOIN latest p ON p.loan_id = l.loan_id
WHERE l.disbursed_at < $as_of AND (
    (p.loan_id IS NULL AND l.disbursed_at >= $last_month_end - INTERVAL 1 DAY)
    OR (p.outstanding > 0 AND p.observed_at >= $last_month_end - INTERVAL 1 DAY))
ORDER BY l.loan_id
"""
"""Loans disbursed before the as-of time and still open: their latest month-end row (the one of the last
month end; a loan whose rows stopped was repaid or written off) shows a balance, or they were paid out
since the last month end."""

VALUE, AMOUNT = MONEY.format("r.appraised_value"), MONEY.format("r.amount")
"""Money summed as exact decimals, as the features sum it: a sum of floats depends on the order the rows come in
(the raw store's files read by DuckDB from a disk, or as an Arrow dataset from object storage), in its last bit."""

WAREHOUSE = f"""
SELECT b.loan_id,
       CAST(coalesce(sum({VALUE}) FILTER (WHERE r.received_at < b.disbursed_at
                AND coalesce(r.released_at >= b.disbursed_at, true)), 0) AS DOUBLE) AS warehouse_value_at_disbursement,
       CAST(coalesce(sum({VALUE}) FILTER (WHERE coalesce(r.released_at >= $as_of, true)), 0) AS DOUBLE)
           AS warehouse_value_now
FROM book b LEFT JOIN inventory_receipts r ON r.merchant_id = b.merchant_id AND r.received_at < $as_of
GROUP BY b.loan_id
"""
"""The merchant's goods in partner warehouses at disbursement and now, at their appraisal (no loan names
its pledged receipts: the goods are the pool the limit engine lends against)."""

RECEIVABLES = f"""
SELECT b.loan_id, CAST(coalesce(sum({AMOUNT}), 0) AS DOUBLE) AS financed_receivables,
       CAST(coalesce(sum({AMOUNT}) FILTER (WHERE r.due_at < $as_of AND coalesce(r.paid_at >= $as_of, true)), 0)
            AS DOUBLE) AS financed_overdue,
       coalesce(max(date_diff('day', r.due_at, $as_of)) FILTER (WHERE r.due_at < $as_of
                AND coalesce(r.paid_at >= $as_of, true)), 0) AS financed_oldest_overdue_days
FROM book b LEFT JOIN receivables r ON r.merchant_id = b.merchant_id AND r.issued_at < b.disbursed_at
     AND coalesce(r.paid_at >= b.disbursed_at, true) AND r.due_at >= b.disbursed_at
GROUP BY b.loan_id
"""
"""The receivables open and not yet due at disbursement (the financed pool: what the limit engine counted)
and how much of them is past due and unpaid now."""


@dataclass(frozen=True)
class MonitorResult:
    as_of: datetime
    loans: int
    alerts: pd.DataFrame
    table: Path
    watch_list: Path
    bundle_id: str

    def describe(self) -> str:
        counts = self.alerts["action"].value_counts()
        by_action = ", ".join(f"{n} {action}" for action, n in counts.items()) or "none"
        return (f"monitor as of {self.as_of:%Y-%m-%d}: {self.loans:,} live loans, {len(self.alerts):,} alerts on "
                f"{self.alerts['loan_id'].nunique():,} loans ({by_action})\n  alerts:     {self.table}\n"
                f"  watch list: {self.watch_list}\n  live bundle: {self.bundle_id}")


def default_as_of(store: RawStore) -> datetime:
    """The raw store's latest day: midnight after its last order (the day's facts are all in)."""
    con = store.connect()
    orders = table_readers(store, con, ["orders"])["orders"]
    (last,) = fetch_one(con, f"SELECT max(ordered_at) FROM {orders}")
    if last is None:
        raise ScfriskError(f"raw store {store.root} has no orders; run `scfrisk ingest` first")
    return (pd.Timestamp(last).floor("D") + pd.Timedelta(days=1)).to_pydatetime()


def live_loans(store: RawStore, as_of: datetime) -> pd.DataFrame:
    """Every loan open at `as_of` with its latest month-end status and its collateral figures."""
    con = store.connect()
    table_readers(store, con, ["loans", "loan_applications", "loan_performance", "inventory_receipts",
                               "receivables"])
    last_month_end = pd.Timestamp(as_of).to_period("M").to_timestamp() - pd.Timedelta(microseconds=1)
    params = {"as_of": as_of, "last_month_end": last_month_end.to_pydatetime()}
    book = con.execute(LIVE_LOANS, params).df()
    con.register("book", book)
    for sql in (WAREHOUSE, RECEIVABLES):
        book = book.merge(con.execute(sql, {"as_of": as_of}).df(), on="loan_id", how="left")
    return book


def loan_book(store: RawStore, model: PDModel, policy: CreditPolicy, as_of: datetime,
              current: pd.DataFrame | None = None, kept: Path | None = None) -> pd.DataFrame:
    """The book `credit.monitoring.early_warnings` reads: live loans, features now and at each baseline,
    and the model's PD now and at origination (the same model on the application's features).
    `current`: the features of every merchant as of `as_of` when the caller has them (the refresh's online
    vector, equal to the point-in-time SQL's), so they are not computed a second time. `kept`: the folder the
    PDs at origination are kept in from one day to the next (`pipelines.origination`); None: all computed.
    Each point-in-time query computes only the features its part reads (the baselines: the spikes')."""
    loans = live_loans(store, as_of)
    lags = baselines(policy.monitoring)
    merchants = loans["merchant_id"].drop_duplicates()

    def features_at(times: list[datetime], names: list[str]) -> pd.DataFrame:
        """The merchants' features `names` at each time, indexed by (merchant_id, as_of)."""
        entities = pd.concat([pd.DataFrame({"merchant_id": merchants, "as_of": at}) for at in times],
                             ignore_index=True)
        found = get_training_set(entities, store, features=with_inputs(names))
        found["as_of"] = found["as_of"].astype("datetime64[us]")
        return found.set_index(["merchant_id", "as_of"])

    def rows(at: pd.DataFrame, when: datetime, columns: list[str]) -> pd.DataFrame:
        keys = pd.MultiIndex.from_arrays([loans["merchant_id"], pd.Series(pd.Timestamp(when), index=loans.index)
                                          .astype("datetime64[us]")])
        return at.reindex(keys)[columns].reset_index(drop=True)

    spike_features = sorted({f for names in lags.values() for f in names})
    columns = list(dict.fromkeys([*MERCHANT_FEATURES, *spike_features, *model.feature_names]))
    if current is None:
        now = rows(features_at([as_of], columns), as_of, columns)
    else:
        now = current.set_index("merchant_id").reindex(loans["merchant_id"])[columns].reset_index(drop=True)
    book = pd.concat([loans.reset_index(drop=True), now[list(dict.fromkeys([*MERCHANT_FEATURES, *spike_features]))]],
                     axis=1)
    book["pd_now"] = model.predict_pd(now) if len(now) else []
    book["pd_origination"] = (origination_pd(store, model, loans) if kept is None
                              else cached_origination_pd(kept, store, model, loans).pd)
    if lags:
        before = features_at([as_of - timedelta(days=days) for days in lags], spike_features)
        for days, names in lags.items():
            earlier = rows(before, as_of - timedelta(days=days), names)
            for name in names:
                book[baseline_column(name, days)] = earlier[name].to_numpy()
    return book


def live_bundle(settings: Settings) -> Bundle:
    published = settings.path("published")
    live = current_bundle_id(published)
    if live is None:
        raise ScfriskError(f"no bundle is live in {published}: run `scfrisk run` first; the monitor scores with "
                           "the live bundle's model and publishes the alerts with it")
    bundle = load_bundle(bundle_path(published, live))
    if bundle.on_demand_problem():
        trained = bundle.manifest["feature_set_version"]
        raise ScfriskError(f"the live bundle {live} was trained on feature set {trained}, this code computes "
                           f"{feature_set_version()}: the monitor scores features of this code; run `scfrisk run` "
                           "to publish a model of them")
    return bundle


def check_same_terms(policy: CreditPolicy, bundle: Bundle) -> None:
    """The workspace policy may change `[monitoring]` between runs, not the credit terms the live limits
    were computed with: the new bundle carries the workspace policy beside the live bundle's limits."""
    terms = {"master_scale", "decision", "products"}
    if policy.model_dump(include=terms) != bundle.policy.model_dump(include=terms):
        raise ScfriskError(f"the credit terms of the policy file (version {policy.version}) differ from the live "
                           f"bundle's (version {bundle.policy_version}): run `scfrisk run` to publish limits under "
                           "them first; the monitor changes only what [monitoring] decides")


def bundle_parts(bundle: Bundle, policy_file: Path, alerts: pd.DataFrame, as_of: datetime) -> BundleParts:
    """The live bundle's parts, its policy replaced by the workspace's, with the day's alerts."""
    report = bundle.path / REPORT_FILE
    m = bundle.manifest
    return BundleParts(model_dir=bundle.path / MODEL_DIR, model_version=bundle.model_version,
                       feature_set_version=m["feature_set_version"], features_as_of=bundle.features_as_of,
                       online_features=bundle.path / FEATURES_FILE, limits=bundle.path / LIMITS_FILE,
                       reason_codes=bundle.reasons, policy_file=policy_file,
                       risk_report=report if report.is_file() else None, alerts=alerts,
                       alerts_as_of=pd.Timestamp(as_of).isoformat())


@dataclass(frozen=True)
class Watch:
    """The day's alerts, before they are published."""

    as_of: datetime
    loans: int
    alerts: pd.DataFrame
    table: Path

    def published(self, settings: Settings, bundle_id: str) -> MonitorResult:
        """The result, with the watch-list page of the bundle the alerts went live in."""
        page = write_watch_list(self.table.parent / "watch_list.html", self.alerts, self.as_of, self.loans, bundle_id)
        return MonitorResult(self.as_of, self.loans, self.alerts, self.table, page, bundle_id)


def watch(settings: Settings, store: RawStore, model: PDModel, policy: CreditPolicy, as_of: datetime,
          current: pd.DataFrame | None = None) -> Watch:
    """Every live loan checked as of `as_of` with `model`'s PD; the alerts written to the workspace.
    `current`: every merchant's features as of `as_of`, if known (`loan_book`)."""
    for name in ("merchants", "orders", "loans", "loan_applications"):
        if not store.has_table(name):
            raise ScfriskError(f"raw store {store.root} has no {name}; run `scfrisk ingest` first")
    book = loan_book(store, model, policy, as_of, current, settings.home_dir / "monitor")
    alerts = early_warnings(book, policy, as_of)
    folder = settings.home_dir / "monitor" / f"as_of={as_of:%Y-%m-%d}"
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "alerts.parquet"
    alerts.to_parquet(table, index=False)
    return Watch(as_of, len(book), alerts, table)


def run_monitor(settings: Settings, as_of: datetime | None = None) -> MonitorResult:
    """The day's alerts on every live loan, written and published (see the module docstring)."""
    policy = load_policy(settings.policy_file)
    bundle = live_bundle(settings)
    check_same_terms(policy, bundle)
    store = RawStore.from_settings(settings)
    day = watch(settings, store, bundle.model, policy, as_of or default_as_of(store))
    return day.published(settings, publish(bundle_parts(bundle, Path(settings.policy_file), day.alerts, day.as_of),
                                           settings))


@flow(name="monitor")
def monitor_flow(settings: Settings, as_of: datetime | None = None) -> MonitorResult:
    """Prefect shell of `run_monitor`: one flow run per day monitored."""
    result = run_monitor(settings, as_of)
    log.info(result.describe())
    return result
