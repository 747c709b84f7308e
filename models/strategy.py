"""Strategy analytics for risk officers: what a policy approves, loses and earns, and where to cut off.

Works on limits tables (`models.limits`): the current book (expected figures only) or an out-of-time
backtest, where realised defaults turn expected loss and profit into realised ones. Tables are pure
functions; `write_strategy_report` is the one I/O edge (Parquet + HTML, optionally an MLflow run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from models.html_report import Image, KeyFigures, Paragraph, Section, Table, write_page
from models.limits import EXCLUSION_RULES, check_input, expected_profit, product_limits
from models.policy import CreditPolicy
from pipelines.errors import ScfriskError

log = logging.getLogger(__name__)

RATE_FORMATS = {
    "approval_rate": "{:.1%}",
    "share": "{:.1%}",
    "expected_bad_rate": "{:.2%}",
    "realised_bad_rate": "{:.2%}",
    "cutoff_pd": "{:.2%}",
}


def backtest_limits(test: pd.DataFrame, policy: CreditPolicy) -> pd.DataFrame:
    """Limits each out-of-time application would have got for its own product, with realised outcomes.

    `test` holds one row per application: pd, defaulted (0/1), product, segment and the limit features.
    """
    missing = [c for c in ("defaulted", "product") if c not in test.columns]
    if missing:
        raise ScfriskError(f"backtest set misses columns {missing}")
    if "merchant_id" not in test.columns:
        test = test.assign(merchant_id=test.index.astype(str))
    check_input(test, policy.master_scale)
    frames = []
    for product, group in test.groupby("product", sort=False, observed=True):
        terms = policy.product(str(product))  # a product the policy does not know: PolicyError
        limits = product_limits(group, str(product), policy)
        defaulted = group["defaulted"].to_numpy(dtype=float)
        limits["defaulted"] = defaulted
        limits["realised_loss"] = defaulted * terms.lgd * limits["ead"].to_numpy()
        apr = np.nan_to_num(limits["apr"].to_numpy())
        limits["realised_profit"] = expected_profit(limits["ead"].to_numpy(), apr, defaulted, terms)
        frames.append(limits)
    return pd.concat(frames).sort_index()


def summarise(limits: pd.DataFrame, by: str) -> pd.DataFrame:
    """Approval rate, bad rates, EL and profit per value of `by` (grade, product or segment)."""
    frame = limits.assign(
        approved_pd=limits["pd"].where(limits["eligible"]),
        approved_limit=limits["limit"].where(limits["eligible"]),
    )
    aggregations = {
        "count": ("eligible", "size"),
        "approval_rate": ("eligible", "mean"),
        "expected_bad_rate": ("approved_pd", "mean"),
        "total_limit": ("limit", "sum"),
        "expected_loss": ("expected_loss", "sum"),
        "expected_profit": ("expected_profit", "sum"),
    }
    if "defaulted" in frame.columns:
        frame["approved_bad"] = frame["defaulted"].where(frame["eligible"])
        aggregations |= {
            "realised_bad_rate": ("approved_bad", "mean"),
            "realised_loss": ("realised_loss", "sum"),
            "realised_profit": ("realised_profit", "sum"),
        }
    return frame.groupby(by, observed=True).agg(**aggregations).reset_index()


def exclusions(limits: pd.DataFrame) -> pd.DataFrame:
    """Why the approval rate is what it is: per product, the rows each eligibility rule turned away (the
    first rule a row fails, in the order the policy checks them) and the rows left eligible, with their
    share of the product's rows and, on a backtest, their realised bad rate (does the rule keep out risk?)."""
    rule = limits["exclusion_reason"].astype(object).where(~limits["eligible"], "eligible").astype(str)
    frame = limits.assign(rule=rule)
    aggregations: dict[str, tuple[str, str]] = {"count": ("eligible", "size"), "mean_pd": ("pd", "mean")}
    if "defaulted" in frame.columns:
        aggregations["realised_bad_rate"] = ("defaulted", "mean")
    table = frame.groupby(["product", "rule"], observed=True).agg(**aggregations).reset_index()
    table["share"] = table["count"] / table.groupby("product", observed=True)["count"].transform("sum")
    order = {name: i for i, name in enumerate(["eligible", *EXCLUSION_RULES])}
    table = table.sort_values(["product", "rule"], key=lambda c: c.map(order) if c.name == "rule" else c)
    table.insert(2, "meaning", table["rule"].map({"eligible": "eligible", **EXCLUSION_RULES}))
    return table.reset_index(drop=True)


def cutoff_curve(limits: pd.DataFrame, points: int = 101) -> pd.DataFrame:
    """Per product: approving every eligible row with PD <= cut-off, at `points` PD quantiles.

    Cumulative sums over rows sorted by PD give every cut-off in one pass.
    """
    realised = "defaulted" in limits.columns
    rows = []
    for product, group in limits.groupby("product", observed=True):
        eligible = group[group["eligible"]].sort_values("pd")
        if eligible.empty:
            continue
        pd_sorted = eligible["pd"].to_numpy()
        cutoffs = np.unique(np.quantile(pd_sorted, np.linspace(0.0, 1.0, points)))
        taken = np.searchsorted(pd_sorted, cutoffs, side="right")
        curve = {
            "product": product,
            "cutoff_pd": cutoffs,
            "approved": taken,
            "approval_rate": taken / len(group),
            "expected_bad_rate": np.cumsum(pd_sorted)[taken - 1] / taken,
            "expected_profit": np.cumsum(eligible["expected_profit"].to_numpy())[taken - 1],
        }
        if realised:
            curve["realised_bad_rate"] = np.cumsum(eligible["defaulted"].to_numpy())[taken - 1] / taken
            curve["realised_profit"] = np.cumsum(eligible["realised_profit"].to_numpy())[taken - 1]
        rows.append(pd.DataFrame(curve))
    return pd.concat(rows, ignore_index=True)


def best_cutoffs(curve: pd.DataFrame) -> pd.DataFrame:
    """The profit-maximising cut-off of each product (realised profit when the curve has it)."""
    profit = "realised_profit" if "realised_profit" in curve.columns else "expected_profit"
    return curve.loc[curve.groupby("product", observed=True)[profit].idxmax()].reset_index(drop=True)


@dataclass(frozen=True)
class StrategyTables:
    by_grade: pd.DataFrame
    by_product: pd.DataFrame
    by_segment: pd.DataFrame
    cutoff_curve: pd.DataFrame
    best_cutoffs: pd.DataFrame
    exclusions: pd.DataFrame

    def items(self) -> list[tuple[str, pd.DataFrame]]:
        return list(vars(self).items())


def strategy_tables(limits: pd.DataFrame) -> StrategyTables:
    """Every table of the strategy report, from a limits table or a backtest."""
    curve = cutoff_curve(limits)
    return StrategyTables(
        by_grade=summarise(limits, "grade"),
        by_product=summarise(limits, "product"),
        by_segment=summarise(limits, "segment"),
        cutoff_curve=curve,
        best_cutoffs=best_cutoffs(curve),
        exclusions=exclusions(limits),
    )


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
    """Parquet per table and `strategy.html` into `out_dir`; also logged to the MLflow run when given."""
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
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        client.log_artifacts(run_id, str(out_dir), artifact_path="strategy")
        profit = "realised_profit" if "realised_profit" in tables.best_cutoffs.columns else "expected_profit"
        for row in tables.best_cutoffs.itertuples():
            client.log_metric(run_id, f"strategy.{row.product}.best_cutoff_pd", float(row.cutoff_pd))
            client.log_metric(run_id, f"strategy.{row.product}.best_{profit}", float(getattr(row, profit)))
    log.info("strategy report written to %s", page)
    return page
