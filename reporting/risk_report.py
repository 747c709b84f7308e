"""The risk report of one model version: what a risk officer or validator reads before trusting a PD model.

`risk_report_sections` builds the whole content from data -- the model, a scored population with its
slices and labels, the gate decision and optionally the other model of the champion/challenger pair --
and `render_risk_report` turns it into one self-contained HTML page through `reporting.html`, the
renderer every report of the project shares. Reading MLflow and the registry is glue in `pipelines.report`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from core.errors import ScfriskError
from explanation.contributions import (
    Explanation,
    compare_importance,
    explain,
    global_importance,
    importance_by,
)
from explanation.reason_codes import RAISES, REFERENCES_KEY, reference_values, top_reasons
from features.definitions import FEATURE_INDEX, Feature
from models.evaluation import grades_by, metrics_by, pd_metrics, population_stability_index
from models.gates import GateDecision
from models.pd_model import PDModel
from models.splits import split_summary
from reporting.html import Image, KeyFigures, Paragraph, Section, Table, render_page
from reporting.model_card import LIMITATIONS
from reporting.plots import calibration_plot

TITLE = "Risk report"
GROUP_COLUMNS = ("segment", "merchant_type", "product")
"""Population columns the report breaks explanations and metrics down by, when present."""
ID_COLUMNS = ("merchant_id", "application_id")
EXPLAIN_ROWS = 2000
"""Test rows explained for the global views: exact TreeSHAP costs ~2 ms a row for a 300-tree model."""
TOP_FEATURES, DEPENDENCE_FEATURES, SAMPLE_DECISIONS = 12, 4, 8
RATE = "{:.2%}"
METRIC_FORMATS = {
    "default_rate": RATE,
    "mean_pd": RATE,
    "auc": "{:.3f}",
    "gini": "{:.3f}",
    "ks": "{:.3f}",
    "brier": "{:.4f}",
    "log_loss": "{:.4f}",
    "ece": "{:.4f}",
    "bad_rate": RATE,
    "share": "{:.1%}",
}
PURPOSE = (
    "Probability of default (90+ days past due within the performance window) of a merchant's credit "
    "application on the platform. The PD sets the grade on the master scale, and through it eligibility, "
    "limits and prices per product. It must not be used for marketing or for any decision on protected "
    "attributes, which are never features."
)
SHAP_SCALE = (
    "Explanations are exact TreeSHAP values of the gradient-boosted model, in its log-odds (raw margin) "
    "space: for every merchant, the base value plus the contributions equals the model's margin exactly. "
    "The calibrated PD is a monotone increasing function of that margin, so a factor that raises the margin "
    "raises the PD and the order of reasons is the same on both scales; the size of a contribution in PD "
    "points depends on where the merchant sits on the calibration curve, so contributions are quoted in "
    "log-odds only."
)
EXPLANATION_LIMITS = (
    (
        "SHAP shares credit between correlated features (e.g. sales over 30 and 90 days): a factor's "
        "contribution is its share of the effect, not the effect of changing it alone."
    ),
    (
        "Contributions are measured against the average training merchant (the base value); the reference "
        "value quoted in a reason is the typical value among approved merchants, a plain-language anchor, "
        "not the SHAP baseline."
    ),
    "Global views are computed on a random sample of the out-of-time test population.",
)


@dataclass(frozen=True)
class OtherModel:
    """The other side of the champion/challenger pair, for the importance comparison."""

    role: str
    version: str
    model: PDModel


def _require(population: pd.DataFrame, model: PDModel) -> None:
    missing = [c for c in ("y", "slice", *model.feature_names) if c not in population.columns]
    if missing:
        raise ScfriskError(
            f"the report population lacks column(s) {missing[:10]}; it needs the model's features, the 0/1 "
            "default label 'y' and 'slice' (train/valid/test)"
        )
    if not (population["slice"] == "test").any():
        raise ScfriskError("the report population has no 'test' rows: out-of-time results cannot be shown")


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def importance_figure(importance: pd.Series, title: str) -> Figure:
    top = importance.head(TOP_FEATURES)[::-1]
    figure, ax = _figure(7, 0.3 * len(top) + 1.2)
    ax.barh(top.index, top.to_numpy(), color="#1f5fbf")
    ax.set(xlabel="mean |SHAP| (log-odds)", title=title)
    return figure


def beeswarm_figure(explanation: Explanation, inputs: pd.DataFrame, seed: int) -> Figure:
    """One row of dots per feature: where each merchant's contribution lies, coloured by its value's rank."""
    features = global_importance(explanation.values).head(TOP_FEATURES).index[::-1]
    rng = np.random.default_rng(seed)
    figure, ax = _figure(8, 0.42 * len(features) + 1.4)
    for row, name in enumerate(features):
        shap_values = explanation.values[name].to_numpy()
        column = inputs[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            colour = np.full(len(column), 0.5)
        else:
            colour = column.rank(pct=True).to_numpy()
        jitter = rng.normal(0, 0.12, len(shap_values))
        points = ax.scatter(
            shap_values, row + jitter, c=colour, cmap="coolwarm", vmin=0, vmax=1, s=6, alpha=0.7, linewidths=0
        )
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(features)), list(features))
    ax.set(xlabel="SHAP value (log-odds; > 0 raises risk)", title="Contribution of each feature per merchant")
    bar = figure.colorbar(points, ax=ax, ticks=[0, 1], pad=0.01)
    bar.ax.set_yticklabels(["low value", "high value"])
    return figure


def dependence_figure(
    explanation: Explanation, inputs: pd.DataFrame, names: Sequence[str], definitions: Mapping[str, Feature]
) -> Figure:
    """How each top feature's value maps to its contribution; missing values in grey at the left."""
    figure = Figure(figsize=(10, 3.6 * ((len(names) + 1) // 2)))
    axes = figure.subplots((len(names) + 1) // 2, 2, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        shap_values, column = explanation.values[name], inputs[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            levels = [level for level in column.cat.categories if (column == level).any()]
            ax.boxplot([shap_values[column == level].to_numpy() for level in levels], showfliers=False)
            ax.set_xticks(range(1, len(levels) + 1), levels, rotation=30, ha="right")
        else:
            known = column.notna()
            ax.scatter(column[known], shap_values[known], s=6, alpha=0.5, color="#1f5fbf", linewidths=0)
            if (~known).any():
                left = column[known].min() if known.any() else 0.0
                ax.scatter(
                    np.full((~known).sum(), left),
                    shap_values[~known],
                    s=6,
                    alpha=0.5,
                    color="grey",
                    linewidths=0,
                    label="missing",
                )
                ax.legend(frameon=False, loc="best")
        ax.axhline(0, color="grey", lw=0.8)
        unit = definitions[name].unit if name in definitions else ""
        ax.set(xlabel=f"value ({unit})" if unit else "value", ylabel="SHAP (log-odds)", title=name)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure


def comparison_figure(table: pd.DataFrame, labels: tuple[str, str]) -> Figure:
    top = table.head(TOP_FEATURES)[::-1]
    figure, ax = _figure(7, 0.35 * len(top) + 1.2)
    y = np.arange(len(top))
    ax.barh(y + 0.2, top["champion_share"], height=0.4, label=labels[0], color="#1f5fbf")
    ax.barh(y - 0.2, top["challenger_share"], height=0.4, label=labels[1], color="#e07b39")
    ax.set_yticks(y, top["feature"])
    ax.set(xlabel="share of total mean |SHAP|", title="Feature importance, champion vs challenger")
    ax.legend(frameon=False)
    return figure


def reliability_image(y: np.ndarray, pd_values: np.ndarray) -> Image:
    """The validation calibration plot, the same picture the training run logs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = calibration_plot(y, pd_values, Path(tmp) / "calibration.png")
        return Image(path.read_bytes(), "Observed default rate against mean PD, equal-count bins (OOT test)")


def reliability_table(y: np.ndarray, pd_values: np.ndarray, bins: int = 10) -> pd.DataFrame:
    order = np.argsort(pd_values, kind="stable")
    rows = [
        {"bin": i + 1, "rows": len(idx), "mean_pd": pd_values[idx].mean(), "default_rate": y[idx].mean()}
        for i, idx in enumerate(np.array_split(order, bins))
        if len(idx)
    ]
    return pd.DataFrame(rows)


def characteristic_stability(expected: pd.DataFrame, actual: pd.DataFrame) -> pd.DataFrame:
    """CSI per feature (PSI of its distribution), test against train; missing values form their own bin."""
    rows = []
    for name in expected.columns:
        before, after = expected[name], actual[name]
        if isinstance(before.dtype, pd.CategoricalDtype):
            codes_before, codes_after = before.cat.codes.to_numpy(float), after.cat.codes.to_numpy(float)
        else:
            floor = np.nanmin(np.concatenate([before.to_numpy(float), after.to_numpy(float), [0.0]])) - 1.0
            codes_before, codes_after = (
                before.fillna(floor).to_numpy(float),
                after.fillna(floor).to_numpy(float),
            )
        rows.append(
            {
                "feature": name,
                "csi": population_stability_index(codes_before, codes_after),
                "missing_train": before.isna().mean(),
                "missing_test": after.isna().mean(),
            }
        )
    table = pd.DataFrame(rows).sort_values("csi", ascending=False, ignore_index=True)
    table["status"] = pd.cut(
        table["csi"], [-np.inf, 0.10, 0.25, np.inf], labels=["stable", "watch", "shifted"]
    )
    return table.astype({"status": object})


def decision_sample(
    model: PDModel,
    population: pd.DataFrame,
    references: Mapping[str, object],
    definitions: Mapping[str, Feature],
    size: int,
    seed: int,
) -> pd.DataFrame:
    """A few test merchants spread over the grades, each with PD, grade, outcome and its reason codes."""
    test = population[population["slice"] == "test"]
    per_grade = max(1, size // max(1, test["grade"].nunique()))
    picked = (
        test.sample(frac=1.0, random_state=seed).groupby("grade").head(per_grade).sort_values("pd").head(size)
    )
    inputs = model.prepare(picked)
    reasons = top_reasons(explain(model.booster, inputs).values, inputs, references, definitions)
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
                "merchant": label,
                "pd": row.pd,
                "grade": row.grade,
                "defaulted": bool(row.y),
                "reasons raising risk": " ".join(raised) or "none",
                "main factors lowering risk": " ".join(lowered) or "none",
            }
        )
    return pd.DataFrame(rows)


def _gate_section(decision: GateDecision | None) -> Section:
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
    decision: GateDecision | None = None,
    other: OtherModel | None = None,
    time_col: str | None = None,
    source: str = "",
    seed: int = 0,
    explain_rows: int = EXPLAIN_ROWS,
    sample_decisions: int = SAMPLE_DECISIONS,
    definitions: Mapping[str, Feature] = FEATURE_INDEX,
) -> list[Section]:
    """Every section of the report, from the model and its population (features, `y`, `slice`)."""
    _require(population, model)
    population = population.assign(pd=model.predict_pd(population))
    if model.master_scale is None:
        raise ScfriskError("the model was saved without a master scale; the report needs grades")
    population["grade"] = model.master_scale.assign(population["pd"].to_numpy())
    groups = [c for c in GROUP_COLUMNS if c in population.columns]
    test, train = population[population["slice"] == "test"], population[population["slice"] == "train"]
    y_test, pd_test = test["y"].to_numpy(int), test["pd"].to_numpy()
    metrics = pd_metrics(y_test, pd_test)

    # --- model card summary ------------------------------------------------------------------------
    split = split_summary(population["slice"], population["y"], population[time_col] if time_col else None)
    card = Section(
        "Model card summary",
        [
            Paragraph(PURPOSE),
            KeyFigures(
                {
                    "model version": version,
                    "features": len(model.features),
                    "calibration": model.calibrator.method,
                    "test rows": len(test),
                    "test default rate": f"{metrics['default_rate']:.2%}",
                }
            ),
            Table(
                split.reset_index(),
                caption="Data windows, sample sizes and default rates per slice"
                + (f" (source: {source})" if source else ""),
                formats=METRIC_FORMATS,
            ),
        ],
    )

    # --- out-of-time performance and calibration ----------------------------------------------------
    by_slice = pd.DataFrame(
        [
            {"slice": s, **pd_metrics(part["y"].to_numpy(int), part["pd"].to_numpy())}
            for s, part in population.groupby("slice", sort=False)
            if part["y"].nunique() == 2
        ]
    )
    performance = Section(
        "Out-of-time performance",
        [
            KeyFigures(
                {k.upper(): f"{metrics[k]:.3f}" for k in ("auc", "gini", "ks")}
                | {"Brier": f"{metrics['brier']:.4f}"}
            ),
            Table(
                by_slice,
                caption="Every slice; the test slice is the latest cohorts, never seen in fitting",
                formats=METRIC_FORMATS,
            ),
        ],
    )
    calibration = Section(
        "Calibration",
        [
            Paragraph(
                f"Calibrated with {model.calibrator.method} scaling on the validation cohort; expected "
                f"calibration error on the test slice: {metrics['ece']:.4f}."
            ),
            reliability_image(y_test, pd_test),
            Table(reliability_table(y_test, pd_test), formats=METRIC_FORMATS),
        ],
    )
    grades = grades_by(test.assign(y=test["y"].astype(int)), model.master_scale, groups)
    monotone = model.master_scale.is_monotone(pd_test, y_test)
    grade_section = Section(
        "Grade table",
        [
            Paragraph(
                f"Master scale on the out-of-time test. Observed bad rate rises with the grade: "
                f"{'yes' if monotone else 'NO'}."
            ),
            Table(grades[grades["by"] == "all"].drop(columns=["by", "value"]), formats=METRIC_FORMATS),
        ],
    )

    # --- stability ----------------------------------------------------------------------------------
    if len(train):
        csi = characteristic_stability(model.prepare(train), model.prepare(test))
        psi = population_stability_index(train["pd"].to_numpy(), pd_test)
        stability = Section(
            "Stability",
            [
                KeyFigures(
                    {
                        "score PSI (train vs test)": f"{psi:.3f}",
                        "features shifted (CSI > 0.25)": int((csi["status"] == "shifted").sum()),
                    }
                ),
                Paragraph("PSI < 0.10 stable, 0.10-0.25 watch, > 0.25 shifted."),
                Table(
                    csi,
                    caption="Characteristic stability index per feature",
                    formats={"csi": "{:.3f}", "missing_train": "{:.1%}", "missing_test": "{:.1%}"},
                ),
            ],
        )
    else:
        stability = Section(
            "Stability", [Paragraph("No training rows were supplied: PSI and CSI not computed.")]
        )

    # --- explanations -------------------------------------------------------------------------------
    sample = test.sample(min(explain_rows, len(test)), random_state=seed)
    inputs = model.prepare(sample)
    explanation = explain(model.booster, inputs)
    importance = global_importance(explanation.values)
    top = importance.index[:DEPENDENCE_FEATURES]
    global_blocks = [
        Paragraph(SHAP_SCALE),
        Image.from_figure(
            importance_figure(importance, "Global importance"),
            f"Mean |SHAP| over {len(sample):,} test merchants",
        ),
        Image.from_figure(beeswarm_figure(explanation, inputs, seed), "SHAP beeswarm of the top features"),
        Image.from_figure(
            dependence_figure(explanation, inputs, top, definitions),
            f"Dependence plots of the top {len(top)} features",
        ),
        Table(
            importance.rename("mean |SHAP|")
            .rename_axis("feature")
            .reset_index()
            .assign(
                description=lambda t: [
                    definitions[f].description if f in definitions else "" for f in t["feature"]
                ]
            ),
            caption="Mean |SHAP| per feature (log-odds)",
            formats={"mean |SHAP|": "{:.4f}"},
        ),
    ]
    if other is not None:
        theirs = global_importance(explain(other.model.booster, other.model.prepare(sample)).values)
        this, that = f"this model v{version}", f"{other.role} v{other.version}"
        if other.role == "champion":
            table, labels = compare_importance(theirs, importance), (that, this)
        else:
            table, labels = compare_importance(importance, theirs), (this, that)
        global_blocks += [
            Paragraph(
                f"Compared with the {other.role} (version {other.version}) on the same test merchants."
            ),
            Image.from_figure(comparison_figure(table, labels), "Champion vs challenger importance"),
            Table(
                table,
                caption="Importance and rank, champion vs challenger",
                formats={c: "{:.4f}" for c in ("champion", "challenger")}
                | {c: "{:.1%}" for c in ("champion_share", "challenger_share", "share_change")},
            ),
        ]
    global_section = Section("Global explanations", global_blocks)

    view_blocks: list = []
    for column in [*groups, "grade"]:
        by = importance_by(explanation.values, sample[column].astype(object).fillna("missing"))
        view_blocks.append(
            Table(
                by.head(TOP_FEATURES).rename_axis("feature").reset_index(),
                caption=f"Mean |SHAP| by {column}",
                formats={c: "{:.4f}" for c in by.columns},
            )
        )
    if groups:
        view_blocks.append(
            Table(
                metrics_by(test.assign(y=test["y"].astype(int)), groups),
                caption="Out-of-time metrics by segment and product",
                formats=METRIC_FORMATS,
            )
        )
        view_blocks.append(
            Table(
                grades[grades["by"] != "all"], caption="Grades by segment and product", formats=METRIC_FORMATS
            )
        )
    views = Section("Segment, product and grade views", view_blocks)

    references = (model.metadata or {}).get(REFERENCES_KEY) or reference_values(
        model.prepare(train if len(train) else test), (train if len(train) else test)["pd"]
    )
    decisions = Section(
        "Individual decisions",
        [
            Paragraph(
                "Test merchants across the grades with the reasons that raised their risk (up to four, "
                "largest first) and the two factors that lowered it most; the reference is the typical "
                "value among approved training merchants."
            ),
            Table(
                decision_sample(model, population, references, definitions, sample_decisions, seed),
                formats={"pd": RATE},
            ),
        ],
    )
    limitations = Section(
        "Known limitations", [Paragraph(text.lstrip("- ")) for text in (*LIMITATIONS, *EXPLANATION_LIMITS)]
    )
    return [
        card,
        performance,
        calibration,
        grade_section,
        stability,
        global_section,
        views,
        decisions,
        limitations,
        _gate_section(decision),
    ]


def render_risk_report(sections: Sequence[Section], model_name: str, version: str) -> str:
    """The self-contained HTML page (images inline, prints cleanly, opens offline)."""
    return render_page(
        f"{TITLE}: {model_name} v{version}",
        sections,
        subtitle="PD model validation, explanations and reason codes",
    )
