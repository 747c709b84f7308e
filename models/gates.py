"""Champion/challenger gates: may a newly trained model replace the one in use?

Pure: metrics, what each model was trained and tested on, and the gate settings in; a decision with one
reason per check out, so the rule can be tested without MLflow and the reasons logged verbatim.

Two models are compared only on the same test rows, scored by both, neither having learnt from them
(`comparison_basis`): the same feature set, and either the same data and test rows, or an out-of-time test
that starts after the champion's last training row (the data grew: the champion is re-scored on the
challenger's newer test rows, the usual champion/challenger comparison). Anything else leaves the new model
a challenger; a person may still promote it (`scfrisk promote`), with a recorded reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from core.settings import GatesConfig

ModelKind = Literal["platform", "table"]
"""platform: the feature store's features, registered as `[mlflow].registered_model`; table: a user's own
table (`scfrisk train --table`), registered under a name of its own."""
SplitKind = Literal["out_of_time", "random", "test_table"]
"""How the test rows were chosen: the last months of a time column, a stratified random share, or a given
test table."""
MODEL_KIND_TAG, SPLIT_KIND_TAG = "model_kind", "split_kind"
"""MLflow run tags (and `PDModel.metadata` keys) that say what kind of model a version is."""


@dataclass(frozen=True)
class Lineage:
    """What a model learnt from and was tested on, as recorded on its MLflow run."""

    feature_set_version: str
    """Hash of the feature definitions (platform), or 'table' for a user's own table."""
    data_hash: str
    """All rows of the training data (train, validation and test), see `pipelines.train.data_hash`."""
    test_rows_hash: str | None
    """The test rows alone (None for versions trained before it was recorded)."""
    trained_until: str | None
    """Last date the final model learnt from (the end of its validation slice), with a time column."""
    test_from: str | None
    """First date of the test rows, with a time column."""
    snapshot: str
    """The raw store snapshot (platform) or the data hash, for messages."""

    @classmethod
    def from_run(cls, tags: Mapping[str, str], params: Mapping[str, str]) -> Lineage:
        """From a run's tags and the `split_*` params the training run logs."""
        data = tags.get("data_hash", "")
        return cls(tags.get("feature_set_version", "unknown"), data, tags.get("test_rows_hash"),
                   params.get("split_valid_end"), params.get("split_test_start"), tags.get("raw_snapshot_id", data))


def comparison_basis(champion: Lineage, challenger: Lineage, missing_inputs: Sequence[str]) -> tuple[bool, str]:
    """Whether the champion can be measured on the challenger's test rows, and why (or why not).

    `missing_inputs` are the champion's input columns absent from the challenger's test rows.
    """
    if champion.feature_set_version != challenger.feature_set_version:
        return False, (f"feature sets differ (champion '{champion.feature_set_version}', challenger "
                       f"'{challenger.feature_set_version}')")
    if missing_inputs:
        return False, (f"the challenger's test rows lack {len(missing_inputs)} of the champion's inputs "
                       f"({', '.join(missing_inputs)})")
    if champion.data_hash == challenger.data_hash and champion.test_rows_hash == challenger.test_rows_hash \
            and champion.test_rows_hash is not None:
        return True, f"same data snapshot {challenger.snapshot} and the same test rows"
    if champion.trained_until and challenger.test_from:
        if challenger.test_from > champion.trained_until:  # ISO dates
            return True, (f"champion re-scored on the challenger's test rows from {challenger.test_from} "
                          f"(snapshot {challenger.snapshot}), after its own training ended "
                          f"{champion.trained_until}")
        return False, (f"the champion learnt from rows up to {champion.trained_until}, on or after the "
                       f"challenger's first test row ({challenger.test_from})")
    return False, (f"different data snapshots ({champion.snapshot} vs {challenger.snapshot}) without a time "
                   "split: the champion may have learnt from the challenger's test rows")


@dataclass(frozen=True)
class ChampionComparison:
    """The champion as measured for the gate."""

    version: str
    auc: float | None
    """AUC on the challenger's test rows; None when the two cannot be compared on the same rows."""
    basis: str
    """Why the rows are the same, or why they are not (`comparison_basis`)."""


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: tuple[str, ...]
    """One line per check, starting with 'pass' or 'fail'."""
    comparison: str = ""
    """On which rows the champion was measured, or why it was not compared at all."""

    def as_dict(self) -> dict:
        return asdict(self)


def decide_promotion(challenger_auc: float, challenger_ece: float, score_psi: float, grades_monotone: bool,
                     champion: ChampionComparison | None, gates: GatesConfig) -> GateDecision:
    """Promote only if every gate passes; `champion` is None when there is no champion yet."""
    checks: list[tuple[bool, str]] = []
    if champion is None:
        checks.append((True, "no champion yet: the AUC comparison is waived"))
    elif champion.auc is None:
        checks.append((False, f"not compared with champion v{champion.version}: {champion.basis}; the new "
                              "version stays challenger (`scfrisk promote` it after review)"))
    else:
        floor = champion.auc - gates.auc_tolerance
        checks.append((challenger_auc >= floor, f"test AUC {challenger_auc:.4f} vs champion v{champion.version} "
                                                f"{champion.auc:.4f} - tolerance {gates.auc_tolerance} = {floor:.4f}; "
                                                f"{champion.basis}"))
    checks.append((challenger_ece <= gates.max_ece, f"ECE {challenger_ece:.4f} <= {gates.max_ece}"))
    checks.append((score_psi <= gates.max_score_psi,
                   f"score PSI train vs test {score_psi:.4f} <= {gates.max_score_psi}"))
    if gates.require_monotone_grades:
        checks.append((grades_monotone, "bad rate rises by grade on the test rows"))
    reasons = tuple(f"{'pass' if ok else 'fail'}: {text}" for ok, text in checks)
    return GateDecision(all(ok for ok, _ in checks), reasons, champion.basis if champion else "no champion yet")
