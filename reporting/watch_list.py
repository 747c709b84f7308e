"""The daily watch list for risk officers: every early-warning alert of the day with its evidence and action.

One self-contained HTML page (`reporting.html`), most severe action first; evidence figures are worded
with the feature catalogue's descriptions and units (`credit.monitoring.evidence_label`), so an officer
reads 'Share of orders placed in the last 90 days that were refunded: 18%', not `refund_rate_90d=0.18`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pandas as pd

from credit.monitoring import action_text, evidence_label, evidence_text
from reporting.html import KeyFigures, Paragraph, Section, Table, write_page

SEVERITY = ("escalate", "freeze", "cut", "call_collateral", "watch")
"""Actions, most severe first: the order of the page."""


def evidence_lines(evidence: str | dict) -> str:
    """The evidence of one alert as 'label: value' lines joined by ' | '."""
    figures = json.loads(evidence) if isinstance(evidence, str) else evidence
    return " | ".join(f"{evidence_label(name)[0]}: {evidence_text(name, value)}" for name, value in figures.items())


def watch_list_sections(alerts: pd.DataFrame, as_of: datetime, loans_checked: int, bundle_id: str) -> list[Section]:
    """Summary, alerts per signal and action, then every alert (loan, merchant, signal, action, reason,
    evidence), most severe action first."""
    by_action = alerts["action"].value_counts()
    summary = KeyFigures({
        "as of": f"{as_of:%Y-%m-%d}",
        "live loans checked": loans_checked,
        "alerts": len(alerts),
        "loans alerted": alerts["loan_id"].nunique(),
        "merchants alerted": alerts["merchant_id"].nunique(),
        **{action.replace("_", " "): int(by_action.get(action, 0)) for action in SEVERITY},
    })
    sections = [Section("Summary", [summary, Paragraph(
        f"Published with bundle {bundle_id}: from then on the scoring service applies the freezes, cuts and "
        "escalations below to the merchants' limits and decisions. Thresholds and actions are the policy's "
        "[monitoring] tables (policy.toml).")])]
    if alerts.empty:
        sections.append(Section("Alerts", [Paragraph("No alert today: no live loan crossed a threshold.")]))
        return sections
    counts = (alerts.groupby(["signal", "action"]).agg(alerts=("loan_id", "size"), loans=("loan_id", "nunique"))
              .reset_index().sort_values("alerts", ascending=False))
    counts["signal"] = counts["signal"].str.replace("_", " ")
    counts["action"] = counts["action"].str.replace("_", " ")
    rank = {action: i for i, action in enumerate(SEVERITY)}
    ordered = alerts.assign(_rank=alerts["action"].map(rank)).sort_values(["_rank", "merchant_id", "loan_id"])
    table = pd.DataFrame({
        "merchant": ordered["merchant_id"].to_numpy(),
        "loan": ordered["loan_id"].to_numpy(),
        "product": ordered["product"].str.replace("_", " ").to_numpy(),
        "signal": ordered["signal"].str.replace("_", " ").to_numpy(),
        "action": [action_text(a, p, s) for a, p, s in zip(ordered["action"], ordered["product"],
                                                           ordered["cut_share"])],
        "reason": ordered["reason"].to_numpy(),
        "evidence": [evidence_lines(e) for e in ordered["evidence"]],
    })
    sections.append(Section("Alerts by signal", [Table(counts, max_rows=len(counts))]))
    sections.append(Section("Every alert, most severe action first", [Table(table, max_rows=len(table))]))
    return sections


def write_watch_list(path: Path, alerts: pd.DataFrame, as_of: datetime, loans_checked: int, bundle_id: str) -> Path:
    """The watch-list page of a day's alerts at `path`."""
    return write_page(path, f"Watch list of {as_of:%Y-%m-%d}", watch_list_sections(alerts, as_of, loans_checked,
                                                                                    bundle_id),
                      subtitle="Early warning on every live loan (scfrisk monitor)")
