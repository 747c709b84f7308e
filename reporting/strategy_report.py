"""The strategy report: the strategy tables (`credit.strategy`) as Parquet files and one HTML page a risk
officer reads, with the approval rate explained in sentences; optionally logged to an MLflow run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from credit.limits import EXCLUSION_RULES
from credit.strategy import StrategyTables
from reporting.html import Image, KeyFigures, Paragraph, Section, Table, write_page

log = logging.getLogger(__name__)

RATE_FORMATS = {
    "approval_rate": "{:.1%}",
    "share": "{:.1%}",
    "expected_bad_rate": "{:.2%}",
    "realised_bad_rate": "{:.2%}",
    "cutoff_pd": "{:.2%}",
}


def _cutoff_figure(curve: pd.DataFrame) -> Figure:
    products = list(curve["product"].unique())
    columns = min(2, len(products))
    rows = -(-len(products) // columns)
    figure = Figure(figsize=(5.2 * columns, 3.4 * rows), layout="constrained")
    realised = "realised_profit" in curve.columns
    for i, product in enumerate(products):
        data = curve[curve["product"] == product]
        ax = figure.add_subplot(rows, columns, i + 1)
        profit = data["realised_profit" if realised else "expected_profit"]
        ax.plot(data["approval_rate"], profit, color="#1f5fbf", label="profit")
        best = profit.idxmax()
        ax.axvline(data.loc[best, "approval_rate"], color="#1f5fbf", linestyle=":", linewidth=1)
        ax.set_title(str(product), fontsize=10)
        ax.set_xlabel("approval rate")
        ax.set_ylabel("realised profit" if realised else "expected profit", color="#1f5fbf")
        bad = ax.twinx()
        bad.plot(data["approval_rate"], data["expected_bad_rate"], color="#c0392b", label="expected bad rate")
        if realised:
            bad.plot(
                data["approval_rate"],
                data["realised_bad_rate"],
                color="#c0392b",
                linestyle="--",
                label="realised",
            )
        bad.set_ylabel("bad rate", color="#c0392b")
        bad.legend(loc="upper left", fontsize=8, frameon=False)
    return figure


def _grade_figure(by_grade: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    ax = figure.add_subplot()
    x = np.arange(len(by_grade))
    profit = "realised_profit" if "realised_profit" in by_grade.columns else "expected_profit"
    loss = "realised_loss" if "realised_loss" in by_grade.columns else "expected_loss"
    ax.bar(x - 0.2, by_grade[profit], width=0.4, color="#1f5fbf", label=profit.replace("_", " "))
    ax.bar(x + 0.2, by_grade[loss], width=0.4, color="#c0392b", label=loss.replace("_", " "))
    ax.set_xticks(x, by_grade["grade"].astype(str))
    ax.axhline(0, color="#888", linewidth=0.8)
    ax.legend(frameon=False)
    return figure


def approval_explanation(tables: StrategyTables) -> list[str]:
    """The approval rate in sentences: how many rows each rule turns away, then what the profit curve
    says about the PD cut-off (each product's worst grade) within the rows left eligible."""
    ex = tables.exclusions
    total = int(ex["count"].sum())
    eligible = int(ex.loc[ex["rule"] == "eligible", "count"].sum())
    turned = ex[ex["rule"] != "eligible"].groupby("rule")["count"].sum().sort_values(ascending=False)
    rules = "; ".join(f"{EXCLUSION_RULES[rule]}: {n:,} ({n / total:.0%})" for rule, n in turned.items() if n)
    sentences = [
        f"{eligible / total:.1%} of the {total:,} rows are eligible. Each of the others counts once, under the "
        f"first rule it failed (the order the policy checks them): {rules or 'none'}."
    ]
    profit = "realised_profit" if "realised_profit" in tables.cutoff_curve.columns else "expected_profit"
    for row in tables.best_cutoffs.itertuples(index=False):
        loosest = tables.cutoff_curve.loc[tables.cutoff_curve["product"] == row.product, "approval_rate"].max()
        if row.approval_rate >= loosest:
            why = ": each one's risk-based price covers its expected loss" if profit == "expected_profit" else ""
            sentences.append(f"{row.product}: {profit.replace('_', ' ')} is highest when every eligible row is "
                             f"approved ({loosest:.0%} of rows){why}, so the worst grade the product accepts "
                             "is its PD cut-off.")
        else:
            sentences.append(f"{row.product}: {profit.replace('_', ' ')} peaks at PD <= {row.cutoff_pd:.1%}, "
                             f"approving {row.approval_rate:.0%} of rows against the {loosest:.0%} the policy "
                             "approves.")
    return sentences


def strategy_sections(tables: StrategyTables, policy_version: str) -> list[Section]:
    realised = "realised_profit" in tables.by_product.columns
    total = tables.by_product
    figures = {
        "policy": policy_version,
        "rows": int(total["count"].sum()),
        "approval rate": f"{(total['approval_rate'] * total['count']).sum() / total['count'].sum():.1%}",
        "expected loss": float(total["expected_loss"].sum()),
        "expected profit": float(total["expected_profit"].sum()),
    }
    if realised:
        figures |= {
            "realised loss": float(total["realised_loss"].sum()),
            "realised profit": float(total["realised_profit"].sum()),
        }
    profit = "realised" if realised else "expected"
    return [
        Section(
            "Summary",
            [
                Paragraph(
                    (
                        "Out-of-time backtest: limits the policy would have granted, against realised defaults. "
                        if realised
                        else "Current book under the policy (expected figures). "
                    )
                    + "Profit is one year of the facility drawn at EAD, net of loss, funding and operating cost."
                ),
                KeyFigures(figures),
            ],
        ),
        Section(
            "Why this approval rate",
            [
                *(Paragraph(text) for text in approval_explanation(tables)),
                Table(
                    tables.exclusions,
                    caption="Rows each eligibility rule turns away, per product (first rule failed)",
                    formats={**RATE_FORMATS, "mean_pd": "{:.2%}"},
                ),
            ],
        ),
        Section("By product", [Table(tables.by_product, formats=RATE_FORMATS)]),
        Section(
            "By grade",
            [
                Image.from_figure(_grade_figure(tables.by_grade), f"Profit and loss by grade ({profit})"),
                Table(tables.by_grade, formats=RATE_FORMATS),
            ],
        ),
        Section("By segment", [Table(tables.by_segment, formats=RATE_FORMATS)]),
        Section(
            "Cut-off curves",
            [
                Image.from_figure(
                    _cutoff_figure(tables.cutoff_curve),
                    f"Approval rate vs bad rate vs {profit} profit; dotted line: profit-maximising cut-off",
                ),
                Table(
                    tables.best_cutoffs, caption="Profit-maximising cut-off per product", formats=RATE_FORMATS
                ),
            ],
        ),
    ]


def write_strategy_report(
    tables: StrategyTables,
    out_dir: Path,
    policy_version: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Parquet per table and `strategy.html` into `out_dir`; also logged to the MLflow run when given, under
    `strategy/book` or `strategy/backtest` (expected or realised figures) with metrics named the same way,
    so the two reports of one limits run sit side by side on the model's run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_parquet(out_dir / f"{name}.parquet", index=False)
    page = write_page(
        out_dir / "strategy.html",
        "Credit strategy",
        strategy_sections(tables, policy_version),
        subtitle=f"policy {policy_version}",
    )
    if run_id is not None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        realised = "realised_profit" in tables.best_cutoffs.columns
        kind, profit = ("backtest", "realised_profit") if realised else ("book", "expected_profit")
        client = MlflowClient(tracking_uri)
        client.log_artifacts(run_id, str(out_dir), artifact_path=f"strategy/{kind}")
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[
            Metric(f"strategy.{kind}.{row.product}.{name}", float(value), now, 0)
            for row in tables.best_cutoffs.itertuples()
            for name, value in (("best_cutoff_pd", row.cutoff_pd), (f"best_{profit}", getattr(row, profit)))
        ])
    log.info("strategy report written to %s", page)
    return page
