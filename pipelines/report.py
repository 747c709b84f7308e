"""`scfrisk report`: the risk report of a registered model version, as HTML in the workspace and in MLflow.

Glue only: reads the registry, the training run, the gate settings, the credit policy and the offline
store's monthly snapshots, then calls `reporting.risk_report`. The training flow calls `write_risk_report`
right after registering a version; it also logs the report population (the rows the report was built
from) so `scfrisk report --model-version N` can rebuild the same report later (with the policy and the
snapshots of the workspace as they are then).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path, PurePosixPath

import pandas as pd

from core.errors import ScfriskError
from core.settings import Settings
from credit.policy import load_policy
from explanation.reason_codes import table_definitions
from features.offline_store import OfflineStore, is_monthly
from models.evaluation import GROUP_COLUMNS
from models.gates import MODEL_KIND_TAG, GateDecision
from models.pd_model import PDModel
from reporting.risk_report import (
    ID_COLUMNS,
    POLICY_COLUMNS,
    OtherModel,
    render_risk_report,
    risk_report_sections,
)

log = logging.getLogger(__name__)

ARTIFACT_DIR = "risk_report"
POPULATION_FILE = "population.parquet"
GATE_FILE = "gate_decision.json"
MAX_ROWS_PER_SLICE = 50_000
"""Train and validation rows kept for the report (seeded sample); the test slice is always kept whole."""


def report_file(settings: Settings, version: str) -> Path:
    return settings.path("reports") / f"risk_report_{settings.mlflow.registered_model}_v{version}.html"


def report_population(
    population: pd.DataFrame,
    model: PDModel,
    seed: int,
    time_col: str | None = None,
    max_rows_per_slice: int = MAX_ROWS_PER_SLICE,
) -> pd.DataFrame:
    """The columns and rows a report needs: features, label, slice, groups, ids, the policy's inputs; big
    slices sampled."""
    keep = [
        c
        for c in (*ID_COLUMNS, time_col, *GROUP_COLUMNS, *POLICY_COLUMNS, "y", "slice")
        if c and c in population.columns
    ]
    frame = population[list(dict.fromkeys([*keep, *model.feature_names]))]
    parts = [
        part
        if name == "test" or len(part) <= max_rows_per_slice
        else part.sample(max_rows_per_slice, random_state=seed)
        for name, part in frame.groupby("slice", sort=False)
    ]
    return pd.concat(parts).sort_index()


def feature_snapshots(settings: Settings, model: PDModel) -> dict[str, pd.DataFrame]:
    """The offline store's monthly snapshots of the model's feature-set version (the last
    `features.snapshot_months`, oldest first), month -> the model's features; none for a table's model."""
    metadata = model.metadata or {}
    version = metadata.get("feature_set_version")
    if metadata.get(MODEL_KIND_TAG, "platform") != "platform" or not version or version == "table":
        return {}
    offline = OfflineStore.from_settings(settings)
    files = [path for path in offline.snapshot_files(version) if is_monthly(path)]
    files = files[-settings.features.snapshot_months :] if settings.features.snapshot_months else []
    return {
        PurePosixPath(str(path)).stem.removeprefix("as_of=")[:7]: offline.read_file(path, model.feature_names)
        for path in files
    }


def write_risk_report(
    settings: Settings,
    model: PDModel,
    population: pd.DataFrame,
    version: str,
    *,
    run_id: str | None = None,
    decision: GateDecision | None = None,
    other: OtherModel | None = None,
    time_col: str | None = None,
    source: str = "",
) -> Path:
    """Build the report, write it to `settings.path("reports")` and, with a run, log it and its population."""
    population = report_population(population, model, settings.seed, time_col)
    sections = risk_report_sections(
        model,
        population,
        definitions=table_definitions(model.features),
        version=version,
        gates=settings.gates,
        policy=load_policy(settings.policy_file),
        snapshots=feature_snapshots(settings, model),
        decision=decision,
        other=other,
        time_col=time_col,
        source=source,
        seed=settings.seed,
    )
    path = report_file(settings, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_risk_report(sections, settings.mlflow.registered_model, version), encoding="utf-8")
    if run_id is not None:
        from mlflow import MlflowClient

        client = MlflowClient(settings.tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            stored = Path(tmp) / POPULATION_FILE
            population.to_parquet(stored)
            (Path(tmp) / "report_meta.json").write_text(json.dumps({"time_col": time_col, "source": source}))
            client.log_artifacts(run_id, tmp, ARTIFACT_DIR)
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    log.info("risk report of version %s written to %s", version, path)
    return path


def _download(run_id: str, artifact: str, dst: str) -> Path | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=dst))
    except (MlflowException, OSError):
        return None


def _model_of(settings: Settings, version: str) -> PDModel:
    import mlflow

    from models.registry import ARTIFACT_KEY

    local = mlflow.artifacts.download_artifacts(f"models:/{settings.mlflow.registered_model}/{version}")
    return PDModel.load(Path(local) / "artifacts" / ARTIFACT_KEY)


def _other_side(settings: Settings, version: str) -> OtherModel | None:
    """The champion when this version is not it, else the challenger (when it is another version)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from models.registry import CHALLENGER, CHAMPION

    client, name = MlflowClient(settings.tracking_uri), settings.mlflow.registered_model
    aliases = {}
    for alias in (CHAMPION, CHALLENGER):
        try:
            aliases[alias] = str(client.get_model_version_by_alias(name, alias).version)  # MLflow 3: an int
        except MlflowException:
            continue
    role = CHALLENGER if aliases.get(CHAMPION) == version else CHAMPION
    other = aliases.get(role)
    if other is None or other == version:
        return None
    return OtherModel(role, other, _model_of(settings, other))


def report_for_version(settings: Settings, version: str) -> Path:
    """Rebuild the risk report of a registered version from its run's logged population and gate decision."""
    from mlflow.exceptions import MlflowException

    from models.registry import configure_mlflow

    client, name = configure_mlflow(settings), settings.mlflow.registered_model
    try:
        run_id = client.get_model_version(name, version).run_id
    except MlflowException:
        raise ScfriskError(f"registered model '{name}' has no version {version}") from None
    with tempfile.TemporaryDirectory() as tmp:
        stored = _download(run_id, f"{ARTIFACT_DIR}/{POPULATION_FILE}", tmp)
        if stored is None:
            raise ScfriskError(
                f"version {version} of '{name}' (run {run_id}) has no logged report population "
                f"({ARTIFACT_DIR}/{POPULATION_FILE}); it was trained before risk reports were logged: retrain it"
            )
        population = pd.read_parquet(stored)
        meta_file = _download(run_id, f"{ARTIFACT_DIR}/report_meta.json", tmp)
        meta = json.loads(meta_file.read_text()) if meta_file else {}
        gate_file = _download(run_id, GATE_FILE, tmp)
        gate = json.loads(gate_file.read_text()) if gate_file else None
    decision = GateDecision(bool(gate["promote"]), tuple(gate["reasons"])) if gate else None
    return write_risk_report(
        settings,
        _model_of(settings, version),
        population,
        version,
        run_id=run_id,
        decision=decision,
        other=_other_side(settings, version),
        time_col=meta.get("time_col"),
        source=meta.get("source", ""),
    )
