"""Champion/challenger gates: may a newly trained model replace the one in use?

Pure: metrics and the gate settings in, a decision with one reason per check out, so the rule can be
tested without MLflow and the reasons logged verbatim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipelines.config import GatesConfig


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: tuple[str, ...]
    """One line per check, starting with 'pass' or 'fail'."""

    def as_dict(self) -> dict:
        return asdict(self)


def decide_promotion(challenger_auc: float, challenger_ece: float, score_psi: float, grades_monotone: bool,
                     champion_auc: float | None, gates: GatesConfig) -> GateDecision:
    """Promote only if every gate passes; `champion_auc` is the champion's AUC on the same test rows
    (None when there is no champion yet)."""
    checks: list[tuple[bool, str]] = []
    if champion_auc is None:
        checks.append((True, "no champion yet: the AUC comparison is waived"))
    else:
        floor = champion_auc - gates.auc_tolerance
        checks.append((challenger_auc >= floor, f"OOT AUC {challenger_auc:.4f} vs champion {champion_auc:.4f} "
                                                f"- tolerance {gates.auc_tolerance} = {floor:.4f}"))
    checks.append((challenger_ece <= gates.max_ece, f"ECE {challenger_ece:.4f} <= {gates.max_ece}"))
    checks.append((score_psi <= gates.max_score_psi,
                   f"score PSI train vs test {score_psi:.4f} <= {gates.max_score_psi}"))
    if gates.require_monotone_grades:
        checks.append((grades_monotone, "bad rate rises by grade on the OOT test"))
    reasons = tuple(f"{'pass' if ok else 'fail'}: {text}" for ok, text in checks)
    return GateDecision(all(ok for ok, _ in checks), reasons)
