"""The model card: what a reviewer needs to approve a PD model, as Markdown logged with every run."""

from __future__ import annotations

import pandas as pd

from features.catalogue import PROTECTED_PROXIES
from models.evaluation import Evaluation
from models.gates import GateDecision
from models.pd_model import PDModel

SPLIT_TITLES = {"out_of_time": "out-of-time test", "random": "random test split", "test_table": "given test table"}
"""How the test rows were chosen (`split_kind` in the model's metadata), in the card's words."""
PLATFORM_LIMITATIONS = (
    "- Trained on approved and disbursed applications only: PDs for profiles the policy used to reject "
    "are extrapolations (reject inference is not applied).",
    "- Out-of-time test covers the most recent cohorts only; performance may drift with the economy, "
    "platform rules or a new merchant mix -- monitor score PSI and per-grade bad rates.",
)
LIMITATIONS = (
    "- Monotone constraints encode the expected direction of declared features; categorical effects are "
    "unconstrained.",
    "- Calibrated on the validation cohort; a shift in the default rate needs recalibration, not a refit.",
)


def protected_attributes(model: PDModel) -> str:
    """How protected attributes and their possible proxies are handled, and whether this model uses any."""
    inputs = set(model.feature_names)
    proxies = "\n".join(
        f"- `{name}` ({why}): {'**an input of this model**' if name in inputs else 'not an input of this model'}."
        for name, why in PROTECTED_PROXIES.items()
    )
    used = [name for name in PROTECTED_PROXIES if name in inputs]
    verdict = (
        f"This model was trained on a table that has {', '.join(f'`{n}`' for n in used)}: it shapes the PD but "
        "is never given as a reason, so a decision it sways is not fully explained to the merchant; drop the "
        "column before a model like this decides on credit."
        if used else "None of them shapes this model's PDs."
    )
    return (
        "## Protected attributes and their proxies\n"
        "No protected attribute (sex, age, ethnicity, national origin, religion, marital status, disability) "
        "is in the platform's data, so none is a feature. Features that could stand in for one are declared "
        "once, in `features/catalogue.py` (`PROTECTED_PROXIES`):\n\n" + proxies + "\n\n"
        "The platform model never takes them as inputs, and reason codes never cite them whatever the model. "
        "Region was dropped rather than kept for risk but left unsaid: in the platform's history it carried "
        "under 1% of the model's split gain (no effect on default beyond noise), which does not justify the "
        "risk of geographic redlining, and a factor that moved a decision but may not be told would make the "
        "adverse-action notice incomplete. Region stays in the feature store, so approval rates, limits and "
        "PDs can be monitored by region. Segment (legal form) and category (goods sold) are business "
        f"characteristics and stay in the model and in the reasons.\n\n{verdict}"
    )


def _table(frame: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    frame = frame.reset_index()
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_model_card(title: str, model: PDModel, split: pd.DataFrame, evaluation: Evaluation,
                      decision: GateDecision | None, source: str) -> str:
    m = evaluation.metrics
    platform = model.metadata.get("model_kind", "platform") == "platform"
    split_kind = model.metadata.get("split_kind", "out_of_time")
    features = ", ".join(f"{f.name} ({f.kind}{', ' + format(f.direction, '+d') if f.direction else ''})"
                         for f in model.features)
    performance = pd.DataFrame(
        {"model": [m["test_auc"], m["test_gini"], m["test_ks"], m["test_brier"], m["test_ece"]],
         "logistic baseline": [m["baseline_auc"], m["baseline_gini"], m["baseline_ks"], m["baseline_brier"],
                               m["baseline_ece"]]},
        index=pd.Index(["AUC", "Gini", "KS", "Brier", "ECE"], name="metric"),
    )
    sections = [
        f"# Model card: {title}",
        "## Purpose\n" + (
            "Probability of default (90+ days past due within the performance window) of a merchant's "
            "credit application, used for grades, limits and prices. Not for marketing or any decision on "
            "protected attributes." if platform else
            "Probability of the positive class of the target column of the source table, calibrated on its "
            "validation rows. Not for any decision on protected attributes."),
        f"## Data\nSource: {source}\n\n" + _table(split),
        f"## Model\nLightGBM with monotone constraints. Hyper-parameters, boosting rounds and the "
        f"{model.calibrator.method} calibration are chosen on the validation cohort; the chosen booster is then "
        f"refitted on train + validation (the newest cohort included). {len(model.features)} features: {features}.",
        f"## Performance ({SPLIT_TITLES[split_kind]})\n" + _table(performance)
        + f"\n\nScore PSI train vs test: {m['score_psi']:.4f}. Log loss: {m['test_log_loss']:.4f}.",
    ]
    if "oracle_auc" in m:
        sections.append(f"Simulator's true PD on the same rows: AUC {m['oracle_auc']:.4f}, Brier "
                        f"{m['oracle_brier']:.4f} (model gap: AUC {m['auc_gap_to_oracle']:+.4f}).")
    if not evaluation.grades.empty:
        overall = evaluation.grades[evaluation.grades["by"] == "all"].drop(columns=["by", "value"])
        sections.append(f"## Grades (master scale)\nMonotone bad rate: "
                        f"{'yes' if m.get('grades_monotone') else 'NO'}\n\n" + _table(overall.set_index("grade")))
    if not evaluation.by_group.empty:
        cols = ["by", "value", "n", "default_rate", "auc", "brier", "ece"]
        sections.append("## By segment and product\n" + _table(evaluation.by_group[cols].set_index("by")))
    if decision is not None:
        sections.append(f"## Champion/challenger decision\n{'Promoted' if decision.promote else 'Not promoted'}"
                        ":\n\n" + "\n".join(f"- {r}" for r in decision.reasons))
    sections.append(protected_attributes(model))
    sections.append("## Limitations\n" + "\n".join((*PLATFORM_LIMITATIONS, *LIMITATIONS) if platform else LIMITATIONS))
    return "\n\n".join(sections) + "\n"
