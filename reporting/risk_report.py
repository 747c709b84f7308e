"""The risk report of one model version: what a risk officer or validator reads before trusting a PD model.

`risk_report_sections` builds the whole content from data -- the model, a scored population with its
slices and labels, the gate settings and decision, optionally the credit policy, the monthly feature
snapshots and the other model of the champion/challenger pair -- and `render_risk_report` turns it into one
self-contained HTML page through `reporting.html`, the renderer every report of the project shares.
Reading MLflow, the registry and the offline store is glue in `pipelines.report`.

The page opens with a one-screen summary (approvals, limits and expected loss, decline reasons, model
health against the gate thresholds); every later section is one function of `ReportData`, the numbers
computed once. Features are named by the catalogue's wording, never by column name, and amounts carry the
currency. What the report may say depends on the model's `Scope`: a model trained on a user's own table
has no merchants, no credit policy, and an out-of-time test only when its split was by time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import ScfriskError
from core.settings import GatesConfig
from credit.decision import exclusion_reason
from credit.limits import FEATURES as LIMIT_FEATURES
from credit.policy import CreditPolicy
from credit.strategy import backtest_limits, summarise
from explanation.contributions import (
    Explanation,
    compare_importance,
    explain,
    global_importance,
    importance_by,
)
from explanation.reason_codes import RAISES, REFERENCES_KEY, reference_values, top_reasons
from features.definitions import FEATURE_INDEX, Feature
from models.evaluation import GROUP_COLUMNS, grades_by, metrics_by, pd_metrics, population_stability_index
from models.gates import MODEL_KIND_TAG, SPLIT_KIND_TAG, GateDecision, SplitKind
from models.pd_model import PDModel
from models.splits import split_summary
from models.stability import (
    SHIFTED_PSI,
    STABLE_PSI,
    TREND_RHO,
    monthly_stability,
    stability_table,
)
from reporting.html import Block, Columns, Image, KeyFigures, Paragraph, Section, Status, Table, render_page
from reporting.model_card import LIMITATIONS, PLATFORM_LIMITATIONS
from reporting.plots import (
    beeswarm_figure,
    calibration_plot,
    comparison_figure,
    dependence_figure,
    importance_figure,
    monthly_figure,
)

TITLE = "Risk report"
ID_COLUMNS = ("merchant_id", "application_id")
POLICY_COLUMNS = LIMIT_FEATURES
"""Columns the credit policy reads besides the PD: kept in the report population for the summary's backtest."""
EXPLAIN_ROWS = 2000
"""Test rows explained for the global views: exact TreeSHAP costs ~2 ms a row for a 300-tree model."""
TOP_FEATURES, DEPENDENCE_FEATURES, SAMPLE_DECISIONS = 12, 4, 8
TOP_ROWS = 15
"""Long tables show this many rows; the whole table is folded below them."""
TOP_DECLINE_REASONS, TOP_DRIVERS = 5, 5
CURRENCY = FEATURE_INDEX["net_sales_90d"].unit
"""The platform currency, as the feature catalogue states it (policy amounts are in it too)."""
HIDDEN_UNITS = ("category", "ratio", "count", "number")
"""Units a label does not repeat: a ratio is read as a share, a count as a number."""
RATE = "{:.2%}"
MONEY = "{:,.0f}"
METRIC_FORMATS = {
    "default rate": RATE,
    "mean PD": RATE,
    "AUC": "{:.3f}",
    "Gini": "{:.3f}",
    "KS": "{:.3f}",
    "Brier": "{:.4f}",
    "log loss": "{:.4f}",
    "ECE": "{:.4f}",
    "bad rate": RATE,
    "share": "{:.1%}",
}
PLAIN_COLUMNS = {
    "default_rate": "default rate",
    "mean_pd": "mean PD",
    "auc": "AUC",
    "gini": "Gini",
    "ks": "KS",
    "brier": "Brier",
    "log_loss": "log loss",
    "ece": "ECE",
    "bad_rate": "bad rate",
    "n": "rows",
    "count": "rows",
    "by": "by",
    "value": "value",
}
PLATFORM_PURPOSE = (
    "Probability of default (90+ days past due within the performance window) of a merchant's credit "
    "application on the platform. The PD sets the grade on the master scale, and through it eligibility, "
    "limits and prices per product. It must not be used for marketing or for any decision on protected "
    "attributes, which are never features."
)
TABLE_PURPOSE = (
    "Probability of the positive target of a model trained on its own table (`scfrisk train --table`). "
    "The PD sets the grade on the master scale; the platform's credit policy is not applied to it. It must "
    "not be used for any decision on protected attributes."
)
SHAP_SCALE = (
    "Explanations are exact TreeSHAP values of the gradient-boosted model, in its log-odds (raw margin) "
    "space: for every {entity}, the base value plus the contributions equals the model's margin exactly. "
    "The calibrated PD is a monotone increasing function of that margin, so a factor that raises the margin "
    "raises the PD and the order of reasons is the same on both scales; the size of a contribution in PD "
    "points depends on where the {entity} sits on the calibration curve, so contributions are quoted in "
    "log-odds only."
)
EXPLANATION_LIMITS = (
    (
        "SHAP shares credit between correlated features (e.g. sales over 30 and 90 days): a factor's "
        "contribution is its share of the effect, not the effect of changing it alone."
    ),
    (
        "Contributions are measured against the average training {entity} (the base value); the reference "
        "value quoted in a reason is the typical value among the lower-risk half of the training {entities}, "
        "a plain-language anchor, not the SHAP baseline."
    ),
    "Global views are computed on a random sample of the {test} population.",
)
TABLE_LIMITATION = (
    "Trained on the rows of one table: its PDs hold for populations like that table's, nothing else."
)
SPLIT_LIMITATIONS = {
    "random": (
        "The test rows are a random sample of the same period as the training rows (no time column): the "
        "report measures how the model generalises to new rows, not how it holds up over time."
    ),
    "test_table": (
        "The test rows are the given test table: the report measures the model on that table, and says "
        "nothing of how it holds up over time unless that table is later than the training rows."
    ),
}


@dataclass(frozen=True)
class OtherModel:
    """The other side of the champion/challenger pair, for the importance comparison."""

    role: str
    version: str
    model: PDModel


@dataclass(frozen=True)
class Scope:
    """What the report may speak of: merchants, policy and snapshots (platform), and time (a time split)."""

    platform: bool
    """Trained on the platform's feature store (merchants, catalogue features), not on a user's own table."""
    split: SplitKind
    """How the test rows were chosen: the latest months, a random share, or a given test table."""

    @property
    def out_of_time(self) -> bool:
        return self.split == "out_of_time"

    @property
    def entity(self) -> str:
        return "merchant" if self.platform else "row"

    @property
    def entities(self) -> str:
        return f"{self.entity}s"

    @property
    def test(self) -> str:
        return {"out_of_time": "out-of-time test", "random": "held-out test"}.get(
            self.split, "given test table"
        )


def report_scope(model: PDModel, population: pd.DataFrame, time_col: str | None) -> Scope:
    """The model's kind and split as training records them (`model_kind`, `split_kind` in its metadata).
    A model saved without that record is read from its data: a platform model when every input is a
    catalogue feature, split out of time when a time column orders every test row after every training row."""
    metadata = model.metadata or {}
    platform = metadata.get(
        MODEL_KIND_TAG, "platform" if set(model.feature_names) <= set(FEATURE_INDEX) else "table"
    )
    split = metadata.get(SPLIT_KIND_TAG)
    if split is None:
        split = "random"
        if time_col and time_col in population.columns:
            times = pd.to_datetime(population[time_col], errors="coerce")
            test, train = times[population["slice"] == "test"], times[population["slice"] == "train"]
            split = "out_of_time" if len(test) and len(train) and test.min() > train.max() else "random"
    return Scope(platform == "platform", split)


def feature_label(name: str, definitions: Mapping[str, Feature]) -> str:
    """The catalogue's wording of a feature with its unit, e.g. 'Average days between an order and its
    shipment, orders of the last 90 days (days)'; a column of a user's table is called by its name."""
    feature = definitions.get(name)
    if feature is None or feature.source == "table":
        return f"column '{name}'"
    text = feature.description.split(": ")[0].rstrip(".")
    return text if feature.unit in HIDDEN_UNITS else f"{text} ({feature.unit})"


def _unit(name: str, definitions: Mapping[str, Feature]) -> str:
    """The unit an axis shows: none for categories and a table's plain numbers."""
    unit = definitions[name].unit if name in definitions else ""
    return "" if unit in ("category", "number") else unit


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Column names in words, and group values ('order_financing') too."""
    frame = frame.rename(columns=PLAIN_COLUMNS)
    return frame.assign(value=frame["value"].str.replace("_", " ")) if "value" in frame.columns else frame


@dataclass(frozen=True)
class ReportData:
    """Every number more than one section needs, computed once from the model and its population."""

    model: PDModel
    version: str
    scope: Scope
    definitions: Mapping[str, Feature]
    population: pd.DataFrame
    """All rows with `pd` and `grade` added."""
    test: pd.DataFrame
    train: pd.DataFrame
    metrics: dict[str, float]
    groups: list[str]
    time_col: str | None
    source: str
    seed: int
    sample: pd.DataFrame
    """The test rows explained for the global views."""
    inputs: pd.DataFrame
    explanation: Explanation
    importance: pd.Series
    csi: pd.DataFrame | None
    """Feature stability test against train, with trend and importance share (None without training rows)."""
    score_psi: float | None
    months: pd.DataFrame | None
    """Score stability per month (see `monthly_stability`); None when there is nothing monthly to compare."""
    months_csi: pd.DataFrame | None
    months_source: str
    limits: pd.DataFrame | None
    """The policy's decision on every test application (`strategy.backtest_limits`), platform models only."""
    policy: CreditPolicy | None

    @property
    def y_test(self) -> np.ndarray:
        return self.test["y"].to_numpy(int)

    @property
    def pd_test(self) -> np.ndarray:
        return self.test["pd"].to_numpy()

    def label(self, name: str) -> str:
        return feature_label(name, self.definitions)

    def labels(self, names: Sequence[str]) -> list[str]:
        return [self.label(n) for n in names]


def _require(population: pd.DataFrame, model: PDModel) -> None:
    missing = [c for c in ("y", "slice", *model.feature_names) if c not in population.columns]
    if missing:
        raise ScfriskError(
            f"the report population lacks column(s) {missing[:10]}; it needs the model's features, the 0/1 "
            "default label 'y' and 'slice' (train/valid/test)"
        )
    if not (population["slice"] == "test").any():
        raise ScfriskError("the report population has no 'test' rows: test results cannot be shown")


# --- computations ------------------------------------------------------------------------------------


def monthly_frames(
    population: pd.DataFrame, time_col: str | None, snapshots: Mapping[str, pd.DataFrame] | None
) -> tuple[dict[str, pd.DataFrame], str]:
    """The monthly populations to compare: the offline store's snapshots when given, else the report
    population by month of its time column, else none."""
    if snapshots:
        return dict(
            snapshots
        ), "monthly snapshots of the offline feature store (every merchant as of the month's first day)"
    if time_col and time_col in population.columns:
        months = pd.to_datetime(population[time_col], errors="coerce").dt.to_period("M")
        return {
            str(m): part for m, part in population.groupby(months, sort=True)
        }, f"rows by month of '{time_col}'"
    return {}, ""


def champion_auc(other: OtherModel | None, test: pd.DataFrame) -> float | None:
    """The champion's AUC on this report's test rows, when the other model is the champion and can score them."""
    if (
        other is None
        or other.role != "champion"
        or any(c not in test.columns for c in other.model.feature_names)
    ):
        return None
    return pd_metrics(test["y"].to_numpy(int), other.model.predict_pd(test))["auc"]


def _band(value: float, green: float, red: float) -> Status:
    return Status.GREEN if value <= green else Status.AMBER if value <= red else Status.RED


def model_health(data: ReportData, gates: GatesConfig, baseline_auc: float | None) -> pd.DataFrame:
    """One row per health check: what is measured, its value, its status and the green, amber and red
    bounds. Red is where the champion/challenger gate of scfrisk.toml [gates] fails; amber is the stated
    band below it (half the ECE bound; the usual 0.10 watch level of a PSI)."""
    m = data.metrics
    rows = []
    if baseline_auc is None:
        rows.append(("AUC vs champion", f"{m['auc']:.3f}", Status.NOT_ASSESSED, "no champion", "", ""))
    else:
        floor = baseline_auc - gates.auc_tolerance
        status = (
            Status.GREEN if m["auc"] >= baseline_auc else Status.AMBER if m["auc"] >= floor else Status.RED
        )
        rows.append(
            (
                "AUC vs champion",
                f"{m['auc']:.3f} vs {baseline_auc:.3f}",
                status,
                f">= {baseline_auc:.3f}",
                f">= {floor:.3f}",
                f"< {floor:.3f}",
            )
        )
    half = gates.max_ece / 2
    ece = ("Calibration error (ECE)", f"{m['ece']:.4f}", _band(m["ece"], half, gates.max_ece))
    rows.append((*ece, f"<= {half:g}", f"<= {gates.max_ece:g}", f"> {gates.max_ece:g}"))
    psi_bounds = (f"< {STABLE_PSI}", f"<= {gates.max_score_psi:g}", f"> {gates.max_score_psi:g}")
    if data.score_psi is not None:
        psi = data.score_psi
        rows.append(
            (
                "Score PSI, train vs test",
                f"{psi:.3f}",
                _band(psi, STABLE_PSI, gates.max_score_psi),
                *psi_bounds,
            )
        )
    if data.months is not None:
        worst = float(data.months["score PSI vs first month"].max())
        rows.append(
            (
                f"Score PSI by month (worst of {len(data.months)})",
                f"{worst:.3f}",
                _band(worst, STABLE_PSI, gates.max_score_psi),
                *psi_bounds,
            )
        )
    monotone = data.model.master_scale.is_monotone(
        data.pd_test, data.y_test, gates.min_grade_count, gates.grade_tolerance_z
    )
    rows.append(
        (
            "Bad rate rises by grade",
            "yes" if monotone else "no",
            Status.GREEN if monotone else Status.RED if gates.require_monotone_grades else Status.AMBER,
            "yes",
            "",
            f"a fall > {gates.grade_tolerance_z} s.e.",
        )
    )
    if data.csi is not None:
        shifted = data.csi[data.csi["csi"] > SHIFTED_PSI]
        rows.append(
            (
                f"Features with CSI > {SHIFTED_PSI}",
                f"{len(shifted)} ({shifted['importance_share'].sum():.0%} of importance)",
                Status.GREEN if shifted.empty else Status.AMBER,
                "none",
                "some",
                "(score PSI decides)",
            )
        )
    bounds = [" / ".join(b or "–" for b in row[3:]) if row[3] != "no champion" else row[3] for row in rows]
    return pd.DataFrame(
        {
            "check": [r[0] for r in rows],
            "value": [r[1] for r in rows],
            "status": [r[2] for r in rows],
            "green / amber / red": bounds,
        }
    )


def decline_reasons(limits: pd.DataFrame, policy: CreditPolicy) -> pd.DataFrame:
    """The policy rules that declined most test applications for their product, in the policy's words (each
    names its product), with the share of that product's applications each declined."""
    declined = limits[~limits["eligible"]]
    if declined.empty:
        return pd.DataFrame(columns=["reason", "declined", "of applications"])
    grade_bound = declined["exclusion_reason"].astype(str).isin(("grade", "apr_cap"))
    keys = pd.DataFrame(
        {
            "product": declined["product"].astype(str),
            "code": declined["exclusion_reason"].astype(str),
            "grade": declined["grade"].astype(str).where(grade_bound, ""),
        },
        index=declined.index,
    )
    counts = keys.value_counts(sort=True).head(TOP_DECLINE_REASONS)
    applications = limits["product"].astype(str).value_counts()
    rows = []
    for (product, code, grade), count in counts.items():
        first = keys[(keys["product"] == product) & (keys["code"] == code) & (keys["grade"] == grade)].index[
            0
        ]
        text = exclusion_reason(code, limits.loc[first].to_dict(), product, policy.product(product))
        rows.append(
            {
                "reason": text[:1].upper() + text[1:],
                "declined": int(count),
                "of applications": count / applications[product],
            }
        )
    return pd.DataFrame(rows)


def policy_backtest(test: pd.DataFrame, policy: CreditPolicy | None, scope: Scope) -> pd.DataFrame | None:
    """The policy's decision on each test application for its own product, or None when it cannot apply."""
    needed = ("product", *POLICY_COLUMNS)
    if policy is None or not scope.platform or any(c not in test.columns for c in needed):
        return None
    known = test[test["product"].astype(str).isin(policy.products)]
    if known.empty:
        return None
    return backtest_limits(known.assign(defaulted=known["y"].astype(int)), policy)


def report_data(
    model: PDModel,
    population: pd.DataFrame,
    *,
    version: str,
    time_col: str | None,
    source: str,
    seed: int,
    explain_rows: int,
    definitions: Mapping[str, Feature],
    policy: CreditPolicy | None,
    snapshots: Mapping[str, pd.DataFrame] | None,
) -> ReportData:
    """Score the population, explain a sample of the test rows and measure stability: every shared number."""
    _require(population, model)
    if model.master_scale is None:
        raise ScfriskError("the model was saved without a master scale; the report needs grades")
    population = population.assign(pd=model.predict_pd(population))
    population["grade"] = model.master_scale.assign(population["pd"].to_numpy())
    scope = report_scope(model, population, time_col)
    test, train = population[population["slice"] == "test"], population[population["slice"] == "train"]
    sample = test.sample(min(explain_rows, len(test)), random_state=seed)
    inputs = model.prepare(sample)
    explanation = explain(model.booster, inputs)
    importance = global_importance(explanation.values)
    csi, score_psi = None, None
    if len(train):
        csi = stability_table(
            model, train, test, population, time_col if scope.out_of_time else None, importance
        )
        score_psi = population_stability_index(train["pd"].to_numpy(), test["pd"].to_numpy())
    frames, months_source = monthly_frames(population, time_col if scope.out_of_time else None, snapshots)
    monthly = monthly_stability(model, frames)
    return ReportData(
        model=model,
        version=version,
        scope=scope,
        definitions=definitions,
        population=population,
        test=test,
        train=train,
        metrics=pd_metrics(test["y"].to_numpy(int), test["pd"].to_numpy()),
        groups=[c for c in GROUP_COLUMNS if c in population.columns],
        time_col=time_col,
        source=source,
        seed=seed,
        sample=sample,
        inputs=inputs,
        explanation=explanation,
        importance=importance,
        csi=csi,
        score_psi=score_psi,
        months=monthly[0] if monthly else None,
        months_csi=monthly[1] if monthly else None,
        months_source=months_source,
        limits=policy_backtest(test, policy, scope),
        policy=policy,
    )


# --- figures ---------------------------------------------------------------------------------------------


def _figures(data: ReportData) -> dict[str, object]:
    """What every explanation figure of `reporting.plots` needs from the report's numbers."""
    return {
        "values": data.explanation.values,
        "inputs": data.inputs,
        "labels": dict(zip(data.inputs.columns, data.labels(data.inputs.columns))),
    }


def reliability_image(y: np.ndarray, pd_values: np.ndarray, test: str) -> Image:
    """The validation calibration plot, the same picture the training run logs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = calibration_plot(y, pd_values, Path(tmp) / "calibration.png", title=f"Calibration, {test}")
        return Image(path.read_bytes(), f"Observed default rate against mean PD, equal-count bins ({test})")


def reliability_table(y: np.ndarray, pd_values: np.ndarray, bins: int = 10) -> pd.DataFrame:
    order = np.argsort(pd_values, kind="stable")
    rows = [
        {"bin": i + 1, "rows": len(idx), "mean PD": pd_values[idx].mean(), "default rate": y[idx].mean()}
        for i, idx in enumerate(np.array_split(order, bins))
        if len(idx)
    ]
    return pd.DataFrame(rows)


# --- sections --------------------------------------------------------------------------------------------


def _money(value: float) -> str:
    return f"{CURRENCY} {value:,.0f}"


def _by(limits: pd.DataFrame, column: str) -> pd.DataFrame:
    table = summarise(limits, column)
    out = pd.DataFrame(
        {
            column: table[column].astype(str).str.replace("_", " "),
            "applied": table["count"],
            "approved": table["approval_rate"],
            f"limits ({CURRENCY})": table["total_limit"],
            f"expected loss ({CURRENCY})": table["expected_loss"],
        }
    )
    if "realised_bad_rate" in table.columns:
        out["bad rate"] = table["realised_bad_rate"]
    return out[out["applied"] > 0]


SUMMARY_FORMATS = {
    "approved": "{:.0%}",
    f"limits ({CURRENCY})": MONEY,
    f"expected loss ({CURRENCY})": MONEY,
    "of applications": "{:.0%}",
    "mean PD": RATE,
    "bad rate": "{:.1%}",
}


def _drivers(data: ReportData) -> Paragraph:
    top = data.labels(data.importance.index[:TOP_DRIVERS])
    return Paragraph(
        "What drives the PD most: " + "; ".join(f"({i}) {t}" for i, t in enumerate(top, 1)) + "."
    )


def summary_section(data: ReportData, health: pd.DataFrame, decision: GateDecision | None) -> Section:
    """The first screen: what the policy does with this model, and whether the model is healthy."""
    test, metrics = data.scope.test, data.metrics
    gate = "no decision" if decision is None else "champion" if decision.promote else "challenger only"
    if data.limits is None:
        grades = data.model.master_scale.grade_table(data.pd_test, data.y_test).dropna(subset=["mean_pd"])
        reason = (
            "the model was trained on its own table, not the platform's"
            if not data.scope.platform
            else "no credit policy or no policy inputs were given"
        )
        figures = {
            f"{test} rows": len(data.test),
            "default rate": f"{metrics['default_rate']:.2%}",
            "mean PD": f"{metrics['mean_pd']:.2%}",
        }
        beside = Table(_plain(grades), caption=f"Grades on the {test}", formats=SUMMARY_FORMATS)
        rest: list[Block] = [_drivers(data), Paragraph(f"Approvals, limits and expected loss are not shown: {reason}.")]
    else:
        limits, policy = data.limits, data.policy
        approved = limits[limits["eligible"]]
        figures = {
            f"approved of {len(limits):,} applications": f"{len(approved) / len(limits):.0%}",
            "limits granted": _money(approved["limit"].sum()),
            "expected loss": _money(approved["expected_loss"].sum()),
            "bad rate of approved": f"{approved['defaulted'].mean():.1%}" if len(approved) else "–",
        }
        beside = Table(decline_reasons(limits, policy), caption="Top reasons for declining", formats=SUMMARY_FORMATS)
        rest = [
            Columns(
                [
                    Table(_by(limits, "grade"), caption="By grade", formats=SUMMARY_FORMATS),
                    Table(_by(limits, "product"), caption="By product", formats=SUMMARY_FORMATS),
                ]
            ),
            Paragraph(
                f"Policy {policy.version} applied to the {len(limits):,} applications of the {test}, each for "
                f"the product it asked for; the bad rate is what the approved merchants then did. "
                + _drivers(data).text
            ),
        ]
    health_table = Table(health, caption="Model health; red fails a gate of scfrisk.toml [gates]")
    figures[f"AUC ({gate})"] = f"{metrics['auc']:.3f}"
    return Section("Summary", [KeyFigures(figures), Columns([health_table, beside]), *rest])


def card_section(data: ReportData) -> Section:
    population, time_col, source = data.population, data.time_col, data.source
    split = split_summary(population["slice"], population["y"], population[time_col] if time_col else None)
    return Section(
        "Model card summary",
        [
            Paragraph(PLATFORM_PURPOSE if data.scope.platform else TABLE_PURPOSE),
            KeyFigures(
                {
                    "model version": data.version,
                    "features": len(data.model.features),
                    "calibration": data.model.calibrator.method,
                    "split": {"out_of_time": "by time", "random": "random"}.get(
                        data.scope.split, "test table"
                    ),
                    f"{data.scope.test} rows": len(data.test),
                    "test default rate": f"{data.metrics['default_rate']:.2%}",
                }
            ),
            Table(
                _plain(split.reset_index()),
                caption="Data windows, sample sizes and default rates per slice"
                + (f" (source: {source})" if source else ""),
                formats=METRIC_FORMATS,
            ),
        ],
    )


def performance_section(data: ReportData) -> Section:
    by_slice = pd.DataFrame(
        [
            {"slice": s, **pd_metrics(part["y"].to_numpy(int), part["pd"].to_numpy())}
            for s, part in data.population.groupby("slice", sort=False)
            if part["y"].nunique() == 2
        ]
    )
    caption = (
        "Every slice; the test slice is the latest cohorts, never seen in fitting"
        if data.scope.out_of_time
        else "Every slice; the test slice is a random sample of rows never seen in fitting"
    )
    metrics = data.metrics
    return Section(
        "Out-of-time performance" if data.scope.out_of_time else "Held-out performance",
        [
            KeyFigures(
                {k.upper(): f"{metrics[k]:.3f}" for k in ("auc", "gini", "ks")}
                | {"Brier": f"{metrics['brier']:.4f}"}
            ),
            Table(_plain(by_slice), caption=caption, formats=METRIC_FORMATS),
        ],
    )


def calibration_section(data: ReportData) -> Section:
    return Section(
        "Calibration",
        [
            Paragraph(
                f"Calibrated with {data.model.calibrator.method} scaling on the validation slice; expected "
                f"calibration error on the {data.scope.test}: {data.metrics['ece']:.4f}."
            ),
            reliability_image(data.y_test, data.pd_test, data.scope.test),
            Table(reliability_table(data.y_test, data.pd_test), formats=METRIC_FORMATS),
        ],
    )


def grade_section(data: ReportData, grades: pd.DataFrame) -> Section:
    monotone = data.model.master_scale.is_monotone(data.pd_test, data.y_test)
    return Section(
        "Grade table",
        [
            Paragraph(
                f"Master scale on the {data.scope.test}. Observed bad rate rises with the grade: "
                f"{'yes' if monotone else 'NO'}."
            ),
            Table(
                _plain(grades[grades["by"] == "all"].drop(columns=["by", "value"])), formats=METRIC_FORMATS
            ),
        ],
    )


def shift_explanation(data: ReportData) -> str:
    """Why features shift while the score does not (or does), from the measured trends and importance."""
    csi, psi = data.csi, data.score_psi
    shifted = csi[csi["csi"] > SHIFTED_PSI]
    if shifted.empty:
        return (
            f"No feature shifted between training and test (every CSI <= {SHIFTED_PSI}); score PSI {psi:.3f}."
        )
    score_state = "stable" if psi < STABLE_PSI else "to watch" if psi <= SHIFTED_PSI else "shifted"
    text = (
        f"{len(shifted)} feature(s) shifted between the training and the test slice (CSI > {SHIFTED_PSI}, "
        f"largest {shifted['csi'].iloc[0]:.2f}) while the score's PSI is {psi:.3f} ({score_state}). "
    )
    if "trends_with_time" in shifted.columns:
        trending = shifted[shifted["trends_with_time"]]
        text += (
            f"{len(trending)} of them move steadily with the calendar month over all {data.scope.entities} "
            f"(rank correlation |rho| >= {TREND_RHO})"
            + (": " + "; ".join(data.labels(trending["feature"].head(6))) if len(trending) else "")
            + ". A feature whose level follows the calendar -- a count that accumulates as the platform and "
            "its lending age, or a history that more and more applicants have -- differs between any older "
            "and newer cohort without the applicants being riskier. "
        )
        rest = len(shifted) - len(trending)
        if rest:
            text += f"{rest} shifted without a steady trend: a change of mix or of the data; check them. "
    share = float(shifted["importance_share"].sum())
    text += f"The shifted features carry {share:.0%} of the model's importance (mean |SHAP|)"
    if psi < STABLE_PSI:
        text += ", so the score distribution stays stable: the model relies mostly on features that did not shift."
    else:
        text += (
            "; the score moves with them: watch the monthly score PSI and recalibrate or retrain if it grows."
        )
    return text


def stability_section(data: ReportData) -> Section:
    if data.csi is None:
        return Section(
            "Stability and shifts", [Paragraph("No training rows were supplied: PSI and CSI not computed.")]
        )
    csi = data.csi
    table = pd.DataFrame(
        {
            "feature": data.labels(csi["feature"]),
            "CSI": csi["csi"],
            "status": csi["status"],
            "unknown in train": csi["missing_train"],
            "unknown in test": csi["missing_test"],
            "share of importance": csi["importance_share"],
        }
    )
    if "trend" in csi.columns:
        table["trend with the calendar month"] = csi["trend"].to_numpy()
    return Section(
        "Stability and shifts",
        [
            KeyFigures(
                {
                    "score PSI (train vs test)": f"{data.score_psi:.3f}",
                    f"features shifted (CSI > {SHIFTED_PSI})": int((csi["csi"] > SHIFTED_PSI).sum()),
                }
            ),
            Paragraph(shift_explanation(data)),
            Paragraph(
                f"PSI and CSI < {STABLE_PSI} stable, {STABLE_PSI}-{SHIFTED_PSI} watch, > {SHIFTED_PSI} shifted."
            ),
            Table(
                table,
                caption="Characteristic stability index per feature, test against train (largest first)",
                formats={
                    "CSI": "{:.3f}",
                    "unknown in train": "{:.1%}",
                    "unknown in test": "{:.1%}",
                    "share of importance": "{:.1%}",
                },
                fold_after=TOP_ROWS,
            ),
        ],
    )


def monthly_section(data: ReportData, gates: GatesConfig) -> Section:
    if data.months is None:
        reason = (
            "the test rows are not a later period than the training rows"
            if not data.scope.out_of_time
            else "fewer than two months to compare"
        )
        return Section("Stability over time", [Paragraph(f"No monthly comparison: {reason}.")])
    csi = data.months_csi.copy()
    csi.insert(0, "feature", data.labels(csi.index))
    return Section(
        "Stability over time",
        [
            Paragraph(
                f"Source: {data.months_source}, scored by this model; each month against the first "
                f"({data.months['month'].iloc[0]}) and against the month before."
            ),
            Image.from_figure(
                monthly_figure(data.months, STABLE_PSI, gates.max_score_psi), "Score PSI and mean PD by month"
            ),
            Table(
                data.months,
                caption="Score stability by month",
                formats={
                    "mean PD": RATE,
                    "score PSI vs first month": "{:.3f}",
                    "score PSI vs previous month": "{:.3f}",
                },
            ),
            Table(
                csi.reset_index(drop=True),
                caption="Feature CSI of each month against the first (largest first)",
                formats={c: "{:.3f}" for c in data.months_csi.columns},
                fold_after=TOP_ROWS,
            ),
        ],
    )


def global_section(data: ReportData, other: OtherModel | None) -> Section:
    importance = data.importance
    top = importance.index[:DEPENDENCE_FEATURES]
    blocks: list = [
        Paragraph(SHAP_SCALE.format(entity=data.scope.entity)),
        Image.from_figure(
            importance_figure(importance, data.labels(importance.index), "Global importance", TOP_FEATURES),
            f"Mean |SHAP| over {len(data.sample):,} {data.scope.test} {data.scope.entities}",
        ),
        Image.from_figure(
            beeswarm_figure(
                **_figures(data),
                order=importance.index[:TOP_FEATURES],
                entity=data.scope.entity,
                seed=data.seed,
            ),
            "SHAP beeswarm of the top features",
        ),
        Image.from_figure(
            dependence_figure(
                **_figures(data), names=top, units={n: _unit(n, data.definitions) for n in top}
            ),
            f"Dependence plots of the top {len(top)} features",
        ),
        Table(
            pd.DataFrame({"feature": data.labels(importance.index), "mean |SHAP|": importance.to_numpy()}),
            caption="Mean |SHAP| per feature (log-odds)",
            formats={"mean |SHAP|": "{:.4f}"},
            fold_after=TOP_ROWS,
        ),
    ]
    if other is not None:
        theirs = global_importance(explain(other.model.booster, other.model.prepare(data.sample)).values)
        this, that = f"this model v{data.version}", f"{other.role} v{other.version}"
        if other.role == "champion":
            table, labels = compare_importance(theirs, importance), (that, this)
        else:
            table, labels = compare_importance(importance, theirs), (this, that)
        names = data.labels(table["feature"])
        blocks += [
            Paragraph(f"Compared with the {other.role} (version {other.version}) on the same test rows."),
            Image.from_figure(
                comparison_figure(table, labels, names, TOP_FEATURES), "Champion vs challenger importance"
            ),
            Table(
                table.assign(feature=names),
                caption="Importance and rank, champion vs challenger",
                formats={c: "{:.4f}" for c in ("champion", "challenger")}
                | {c: "{:.1%}" for c in ("champion_share", "challenger_share", "share_change")},
                fold_after=TOP_ROWS,
            ),
        ]
    return Section("Global explanations", blocks)


def views_section(data: ReportData, grades: pd.DataFrame) -> Section:
    blocks: list = []
    for column in [*data.groups, "grade"]:
        values = data.sample[column].astype(object).fillna("missing").astype(str).str.replace("_", " ")
        by = importance_by(data.explanation.values, values)
        by.insert(0, "feature", data.labels(by.index))
        blocks.append(
            Table(
                by.reset_index(drop=True),
                caption=f"Mean |SHAP| by {column}",
                formats={c: "{:.4f}" for c in by.columns},
                fold_after=TOP_ROWS,
            )
        )
    if data.groups:
        test = data.test.assign(y=data.test["y"].astype(int))
        blocks.append(
            Table(
                _plain(metrics_by(test, data.groups)),
                caption=f"{data.scope.test.capitalize()} metrics by segment and product",
                formats=METRIC_FORMATS,
            )
        )
        blocks.append(
            Table(
                _plain(grades[grades["by"] != "all"]),
                caption="Grades by segment and product",
                formats=METRIC_FORMATS,
                fold_after=TOP_ROWS,
            )
        )
    title = "Segment, product and grade views" if data.groups else "Grade views"
    return Section(title, blocks)


def decision_sample(data: ReportData, references: Mapping[str, object], size: int) -> pd.DataFrame:
    """A few test rows spread over the grades, each with PD, grade, outcome and its reason codes."""
    test = data.test
    per_grade = max(1, size // max(1, test["grade"].nunique()))
    picked = (
        test.sample(frac=1.0, random_state=data.seed)
        .groupby("grade")
        .head(per_grade)
        .sort_values("pd")
        .head(size)
    )
    inputs = data.model.prepare(picked)
    reasons = top_reasons(explain(data.model.booster, inputs).values, inputs, references, data.definitions)
    if not data.scope.platform:  # the reason codes' wording speaks of merchants; a table's rows are not
        reasons["description"] = [
            f"{data.label(c)[:1].upper()}{data.label(c)[1:]}: {v}; typical of the lower-risk half: {r}"
            for c, v, r in zip(reasons["code"], reasons["value"], reasons["reference"])
        ]
    ids = next((picked[c].astype(str) for c in ID_COLUMNS if c in picked.columns), picked.index.astype(str))
    rows = []
    for key, (label, row) in zip(picked.index.astype(str), zip(ids, picked.itertuples())):
        mine = reasons[reasons["merchant_id"] == key]
        raised = [
            f"({i}) {text}" for i, text in enumerate(mine.loc[mine["direction"] == RAISES, "description"], 1)
        ]
        lowered = [
            f"({i}) {text}"
            for i, text in enumerate(mine.loc[mine["direction"] != RAISES, "description"][:2], 1)
        ]
        rows.append(
            {
                data.scope.entity: label,
                "PD": row.pd,
                "grade": row.grade,
                "defaulted": bool(row.y),
                "reasons raising risk": " ".join(raised) or "none",
                "main factors lowering risk": " ".join(lowered) or "none",
            }
        )
    return pd.DataFrame(rows)


def decisions_section(data: ReportData, size: int) -> Section:
    reference_rows = data.train if len(data.train) else data.test
    references = (data.model.metadata or {}).get(REFERENCES_KEY) or reference_values(
        data.model.prepare(reference_rows), reference_rows["pd"]
    )
    anchor = (
        "approved training merchants" if data.scope.platform else "the lower-risk half of the training rows"
    )
    return Section(
        "Individual decisions",
        [
            Paragraph(
                f"{data.scope.test.capitalize()} {data.scope.entities} across the grades with the reasons that "
                "raised their risk (up to four, largest first) and the two factors that lowered it most; the "
                f"reference is the typical value among {anchor}."
            ),
            Table(decision_sample(data, references, size), formats={"PD": RATE}),
        ],
    )


def limitations_section(data: ReportData) -> Section:
    scope = data.scope
    if scope.platform:
        texts = [text.lstrip("- ") for text in (*PLATFORM_LIMITATIONS, *LIMITATIONS)]
    else:
        texts = [TABLE_LIMITATION, *(t.lstrip("- ") for t in LIMITATIONS)]
        texts += [SPLIT_LIMITATIONS[scope.split]] if scope.split in SPLIT_LIMITATIONS else []
    texts += [
        t.format(entity=scope.entity, entities=scope.entities, test=scope.test) for t in EXPLANATION_LIMITS
    ]
    return Section("Known limitations", [Paragraph(text) for text in texts])


def gate_section(decision: GateDecision | None) -> Section:
    if decision is None:
        return Section(
            "Gate decision", [Paragraph("No champion/challenger decision was recorded for this version.")]
        )
    verdict = "Promoted to champion" if decision.promote else "Not promoted (challenger only)"
    checks = pd.DataFrame(
        {
            "check": [r.split(": ", 1)[-1] for r in decision.reasons],
            "result": [r.split(": ", 1)[0] for r in decision.reasons],
        }
    )
    return Section("Gate decision", [KeyFigures({"decision": verdict}), Table(checks)])


def risk_report_sections(
    model: PDModel,
    population: pd.DataFrame,
    *,
    version: str,
    gates: GatesConfig,
    decision: GateDecision | None = None,
    other: OtherModel | None = None,
    time_col: str | None = None,
    source: str = "",
    seed: int = 0,
    policy: CreditPolicy | None = None,
    snapshots: Mapping[str, pd.DataFrame] | None = None,
    explain_rows: int = EXPLAIN_ROWS,
    sample_decisions: int = SAMPLE_DECISIONS,
    definitions: Mapping[str, Feature] = FEATURE_INDEX,
) -> list[Section]:
    """Every section of the report, summary first, from the model and its population (features, `y`,
    `slice`); `policy` (platform models) adds approvals, limits and decline reasons, `snapshots` (month ->
    feature frame, oldest first) the monthly stability."""
    data = report_data(
        model,
        population,
        version=version,
        time_col=time_col,
        source=source,
        seed=seed,
        explain_rows=explain_rows,
        definitions=definitions,
        policy=policy,
        snapshots=snapshots,
    )
    health = model_health(data, gates, champion_auc(other, data.test))
    grades = grades_by(data.test.assign(y=data.test["y"].astype(int)), model.master_scale, data.groups)
    return [
        summary_section(data, health, decision),
        card_section(data),
        performance_section(data),
        calibration_section(data),
        grade_section(data, grades),
        stability_section(data),
        monthly_section(data, gates),
        global_section(data, other),
        views_section(data, grades),
        decisions_section(data, sample_decisions),
        limitations_section(data),
        gate_section(decision),
    ]


def render_risk_report(sections: Sequence[Section], model_name: str, version: str) -> str:
    """The self-contained HTML page (images inline, prints cleanly, opens offline)."""
    return render_page(
        f"{TITLE}: {model_name} v{version}",
        sections,
        subtitle="PD model validation, explanations and reason codes",
    )
