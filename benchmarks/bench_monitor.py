"""Early warning against the simulator's truth: precision of the alerts and their lead time before 90 days
past due, against a rule on days past due alone (DPD >= 30 at the latest month end).

Workspace: `scfrisk run --source data_samples/platform` in a temporary folder (or the workspace named by
BENCH_MONITOR_HOME that already ran it on the simulated batch BENCH_MONITOR_SOURCE, default the sample: a
batch of another seed checks the thresholds out of sample, the sample being where they were chosen). The monitor's own code (`pipelines.monitor.loan_book` and
`credit.monitoring.early_warnings`, what `scfrisk monitor` runs) is applied every `STEP_DAYS` days over
`FIRST_DAY`..`LAST_DAY`; the baseline rule reads the same loan book. Truth: the day each loan reached 90
days past due, `oracle/loans.dpd90_at` of the simulator, checked against what `loan_performance` shows (a
month-end row with d >= 90 days past due means the loan crossed 90 on that day minus d - 90).

A (loan, day) pair counts when the loan is live and not yet 90 days past due that day; an alert is right
when the loan reaches 90 days past due within `HORIZON_DAYS`. Lead time: for each loan that reached 90 days
past due in the window, the days from the first as-of day a rule flagged it (within the horizon before)
to the day it crossed 90.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from benchmarks.common import run_measured, write_section
from core.raw_store import RawStore
from core.settings import Settings
from credit.monitoring import LIMIT_ACTIONS, early_warnings
from credit.policy import load_policy
from features.training_set import table_readers
from pipelines.monitor import live_bundle, loan_book

log = logging.getLogger("bench_monitor")

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "platform"
SOURCE = Path(os.environ.get("BENCH_MONITOR_SOURCE", SAMPLE))
FIRST_DAY = datetime(2025, 1, 1)
LAST_DAY = datetime(2025, 7, 1)
STEP_DAYS = 14
HORIZON_DAYS = 180
"""The last as-of day plus the horizon stays inside the sample (it ends 2025-12-31), so every outcome is seen."""
BASELINE_DPD = 30


def day_of_90_dpd(store: RawStore) -> pd.Series:
    """Per loan seen 90 days past due in the raw store, the day it crossed 90 (from its first month-end row at
    90+): what the platform itself could know, to check the oracle against."""
    con = duckdb.connect()
    table_readers(store, con, ["loan_performance"])
    frame = con.execute(
        "SELECT loan_id, arg_min(observed_at, observed_at) AS at, arg_min(days_past_due, observed_at) AS dpd "
        "FROM loan_performance WHERE days_past_due >= 90 GROUP BY loan_id").df()
    day = frame["at"] - pd.to_timedelta(frame["dpd"] - 90, unit="D")
    return pd.Series(day.dt.floor("D").to_numpy(), index=frame["loan_id"].to_numpy())


def scored_pairs(flags: pd.DataFrame, day90: pd.Series) -> pd.DataFrame:
    """(loan, day) pairs live and not yet at 90 days past due, with whether the loan reaches it in the horizon."""
    crossed = flags["loan_id"].map(day90)
    open_ = ~(crossed <= flags["as_of"])
    soon = crossed <= flags["as_of"] + pd.Timedelta(days=HORIZON_DAYS)
    return flags.loc[open_].assign(bad=soon[open_].fillna(False).astype(bool))


def rule_figures(pairs: pd.DataFrame, flagged: pd.Series, day90: pd.Series, days: list[datetime]) -> dict:
    """Precision, recall and lead time of one rule (`flagged`: a boolean per pair)."""
    hits = pairs.loc[flagged.to_numpy()]
    events = day90[(day90 > days[0]) & (day90 <= days[-1] + timedelta(days=STEP_DAYS))]
    first = hits[hits["bad"]].groupby("loan_id")["as_of"].min()
    caught = first.reindex(events.index).dropna()
    lead = (events.reindex(caught.index) - caught).dt.days
    return {
        "flags": len(hits), "loans": hits["loan_id"].nunique(),
        "precision": hits["bad"].mean() if len(hits) else float("nan"),
        "events": len(events), "caught": len(caught),
        "lead_median": float(lead.median()) if len(lead) else float("nan"),
        "lead_mean_all": float(lead.reindex(events.index).fillna(0).mean()) if len(events) else float("nan"),
    }


def measure(settings: Settings) -> dict:
    store = RawStore.from_settings(settings)
    policy = load_policy(settings.policy_file)
    bundle = live_bundle(settings)
    oracle = pd.read_parquet(SOURCE / "oracle" / "loans", columns=["loan_id", "dpd90_at"]).dropna()
    day90 = pd.Series(oracle["dpd90_at"].dt.floor("D").to_numpy(), index=oracle["loan_id"].to_numpy())
    seen = day_of_90_dpd(store)
    gap = (seen - day90.reindex(seen.index)).dt.days
    days = [FIRST_DAY + timedelta(days=STEP_DAYS * i)
            for i in range(int((LAST_DAY - FIRST_DAY).days // STEP_DAYS) + 1)]
    books, alerts, cpu = [], [], []
    for day in days:
        started = time.process_time()
        book = loan_book(store, bundle.model, policy, day)
        alerts.append(early_warnings(book, policy, day))
        cpu.append(time.process_time() - started)
        books.append(book[["loan_id", "merchant_id", "days_past_due"]].assign(as_of=pd.Timestamp(day)))
    pairs = scored_pairs(pd.concat(books, ignore_index=True), day90)
    alerted = pd.concat(alerts, ignore_index=True)
    alerted["as_of"] = alerted["as_of"].astype("datetime64[us]")
    pairs["as_of"] = pairs["as_of"].astype("datetime64[us]")
    key = ["loan_id", "as_of"]
    signals = alerted.groupby(key)["signal"].agg(set).rename("signals")
    acting = alerted[alerted["action"].isin(LIMIT_ACTIONS)].groupby(key).size().rename("acting")
    pairs = pairs.join(signals, on=key).join(acting, on=key)
    has = pairs["signals"].notna()
    rules = {
        f"DPD >= {BASELINE_DPD} alone (baseline)": pairs["days_past_due"] >= BASELINE_DPD,
        "monitor: any alert": has,
        "monitor: alerts that change the limit (freeze, cut, escalate)": pairs["acting"].notna(),
        "monitor: any alert but days past due": pairs["signals"].map(
            lambda s: isinstance(s, set) and bool(s - {"days_past_due"})),
    }
    per_signal = {name: pairs["signals"].map(lambda s, n=name: isinstance(s, set) and n in s)
                  for name in policy.monitoring.signals()}
    merchants = len(pd.read_parquet(SOURCE / "merchants", columns=["merchant_id"]))
    where = "`data_samples/platform`" if SOURCE == SAMPLE else f"a simulated batch of {merchants:,} merchants"
    return {
        "source": where, "days": days,
        "sample_note": ("The policy's thresholds were chosen on this sample and period, so every figure here is "
                        "in-sample (the section 'out of sample' checks them on a batch of another seed)."
                        if SOURCE == SAMPLE else "The policy's thresholds were chosen on `data_samples/platform`; "
                        "this batch is of another seed, so these figures are out of sample."), "pairs": pairs, "day90": day90, "cpu": cpu, "rules": {
            name: rule_figures(pairs, flagged, day90, days) for name, flagged in rules.items()},
        "signals": {name: rule_figures(pairs, flagged, day90, days) for name, flagged in per_signal.items()},
        "seen": len(seen), "seen_same_day": int((gap.abs() <= 1).sum()), "alerts_per_day": len(alerted) / len(days),
    }


def _row(name: str, f: dict) -> str:
    return (f"| {name} | {f['flags']:,} | {f['loans']:,} | {f['precision']:.1%} | {f['caught']:,} of {f['events']:,} "
            f"| {f['lead_median']:.0f} | {f['lead_mean_all']:.0f} |")


def report(m: dict, load: float) -> str:
    pairs, rules = m["pairs"], m["rules"]
    base = rules[f"DPD >= {BASELINE_DPD} alone (baseline)"]
    monitor = rules["monitor: any alert"]
    header = ("| rule | flagged (loan, day) | loans | precision | 90 DPD caught | median lead, days | mean lead, "
              "days (0 if missed) |\n|---|---:|---:|---:|---:|---:|---:|")
    return f"""
`python -m benchmarks.bench_monitor`: the monitor's code on the live loans of {m['source']} every
{STEP_DAYS} days from {m['days'][0]:%Y-%m-%d} to {m['days'][-1]:%Y-%m-%d} ({len(m['days'])} days;
{len(pairs):,} (loan, day) pairs live and not yet at 90 days past due; {pairs['bad'].mean():.1%} of them reach it
within {HORIZON_DAYS} days, the precision of flagging every loan). Truth: the day each loan crossed 90 days past
due, `dpd90_at` of the simulator's oracle ({len(m['day90']):,} defaulters; {m['seen']:,} of them are seen 90+ days
past due in `loan_performance`, {m['seen_same_day']:,} of those on the oracle's day, within a day). Precision: share of flagged (loan, day)
pairs whose loan reaches 90 days past due within {HORIZON_DAYS} days. Lead: days from the first as-of day a rule
flagged the loan to the day it crossed 90, for the loans that crossed in the window. PDs come from the live
model, trained on loans of the same period (its test months are the last ones), so the PD signal is somewhat
optimistic here. {m['sample_note']} Both rules read days past due at month ends only (the data has no daily repayment
status), and the monitor runs every {STEP_DAYS} days here, so lead times are in steps of {STEP_DAYS} days for both.
{m['alerts_per_day']:,.0f} alerts a day on average; CPU per monitored day
{np.median(m['cpu']):.1f} s (median; 1-minute load average at the end: {load:.1f}).

{header}
{chr(10).join(_row(name, f) for name, f in rules.items())}

Against the baseline in the same run: the monitor's alerts flag {monitor['caught']:,} of the {monitor['events']:,}
loans that crossed 90 days past due ({base['caught']:,} for DPD >= {BASELINE_DPD}), a median
{monitor['lead_median'] - base['lead_median']:+.0f} days earlier, at {monitor['precision']:.1%} precision
against {base['precision']:.1%}.

Per signal (a (loan, day) pair counts for every signal that fired on it). The collateral signals guard the
loss given default (the cover of the loan), not its odds: in the simulator neither warehouse releases nor the
financed receivables drive default (goods of weaker merchants turn over more slowly), so they sit at or
below the base rate and only call for collateral. The merchant's own-history signals add lead time (the
monitor without days past due still flags {rules['monitor: any alert but days past due']['caught']:,} of the
{monitor['events']:,} loans, a median {rules['monitor: any alert but days past due']['lead_median']:.0f} days
ahead) at a precision of about 2x the base rate: they feed the watch list, not the limits.

{header}
{chr(10).join(_row(name, f) for name, f in m['signals'].items())}
"""


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    reuse = os.environ.get("BENCH_MONITOR_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(reuse) if reuse else Path(tmp) / "home"
        env = {"SCFRISK_HOME": str(home)}
        try:
            if not reuse:
                run_measured([sys.executable, "-m", "pipelines.cli", "run", "--source", str(SOURCE)], env)
            measured = measure(Settings(home=home))
        finally:
            if not reuse:
                subprocess.run([sys.executable, "-m", "pipelines.cli", "server", "stop"],
                               env={**os.environ, **env}, capture_output=True, check=False)
    body = report(measured, os.getloadavg()[0])
    print(body)
    write_section("Early warning against the truth" + ("" if SOURCE == SAMPLE else ", out of sample"), body)


if __name__ == "__main__":
    main()
