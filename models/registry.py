"""MLflow: experiment set-up inside the workspace, the PD model as a pyfunc, aliases and promotions.

The registered model returns the calibrated PD (LightGBM's own pyfunc flavour would return labels), and
carries the library-native `PDModel` files so other layers can load the model without MLflow's wrapper.
"""

from __future__ import annotations

import getpass
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema

import core
import models
from core.errors import ScfriskError
from core.settings import Settings
from models.gates import ChampionComparison, GateDecision, Lineage, comparison_basis
from models.pd_model import PDModel

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_KEY = "pd_model"


class PDPyfunc(mlflow.pyfunc.PythonModel):
    """`mlflow.pyfunc.load_model(...).predict(raw_features)` -> calibrated PD per row."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = PDModel.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> np.ndarray:
        return self.model.predict_pd(pd.DataFrame(model_input))


def configure_mlflow(settings: Settings) -> MlflowClient:
    """Point MLflow at the workspace store and make sure the experiment keeps its artifacts there too
    (without an explicit location MLflow writes ./mlartifacts in the current directory)."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri)
    if client.get_experiment_by_name(settings.mlflow.experiment) is None:
        location = settings.path("mlflow_artifacts") / settings.mlflow.experiment
        location.mkdir(parents=True, exist_ok=True)
        client.create_experiment(settings.mlflow.experiment, artifact_location=location.as_uri())
    mlflow.set_experiment(settings.mlflow.experiment)
    return client


def log_pd_model(model: PDModel, example: pd.DataFrame, registered_model: str) -> str:
    """Log the model to the active run and register it; returns the new version number."""
    example = example[model.feature_names].head(5).copy()
    for spec in model.features:
        example[spec.name] = example[spec.name].astype(float if spec.kind == "numeric" else object)
    # Column names are the contract; types are not: `PDModel.prepare` reads ints, text-coded numbers and
    # sentinels, which a typed schema would reject before it gets the chance.
    signature = ModelSignature(inputs=Schema([ColSpec(AnyType(), f.name) for f in model.features]),
                               outputs=Schema([ColSpec("double", "pd")]))
    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save(Path(tmp) / ARTIFACT_KEY)
        info = mlflow.pyfunc.log_model(name=ARTIFACT_KEY, python_model=PDPyfunc(), artifacts={ARTIFACT_KEY: str(saved)},
                                       signature=signature, input_example=example,
                                       registered_model_name=registered_model,
                                       code_paths=[str(Path(p).parent) for p in (models.__file__, core.__file__)],
                                       pip_requirements=_requirements())
    return str(info.registered_model_version)


def _requirements() -> list[str]:
    """Pinned runtime needs of the pyfunc (skips MLflow's slow environment inference)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "lightgbm", "numpy", "pandas", "scikit-learn",
                                                     "pydantic", "pyarrow")]


@dataclass(frozen=True)
class RegisteredPD:
    """A registered PD model and the version it is: both from one read of the alias."""

    model: PDModel
    version: str
    run_id: str


def load_registered(settings: Settings, alias: str = CHAMPION) -> RegisteredPD | None:
    """The version an alias points to, with its PDModel and training run; None when no version carries it.

    One read of the alias: read twice (once for the model, once for its number), a promotion or a rollback
    in between would label one version's scores with another's number. Read-only: unlike
    `configure_mlflow`, nothing is created and MLflow's process-wide tracking URI is left alone.
    """
    from mlflow.artifacts import download_artifacts

    client, name = MlflowClient(settings.tracking_uri), settings.mlflow.registered_model
    try:
        found = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    uri = f"{client.get_model_version_download_uri(name, found.version)}/artifacts/{ARTIFACT_KEY}"
    try:
        with tempfile.TemporaryDirectory(prefix="scfrisk-model-") as tmp:
            model = PDModel.load(download_artifacts(artifact_uri=uri, dst_path=tmp))
    except (MlflowException, OSError, ScfriskError) as error:
        raise ScfriskError(
            f"registered model '{name}' v{found.version} ({alias}): its files at {uri} cannot be read "
            f"({str(error).splitlines()[0]}); restore the workspace's artifact store "
            f"({settings.path('mlflow_artifacts')}) or make another version the {alias}"
        ) from None
    return RegisteredPD(model, str(found.version), found.run_id)


def load_pd_model(settings: Settings, alias: str = CHAMPION) -> PDModel | None:
    """The registered PDModel behind an alias, or None when no version carries it."""
    found = load_registered(settings, alias)
    return None if found is None else found.model


def model_settings(settings: Settings, registered_model: str) -> Settings:
    """The workspace settings with another registered model: the registry helpers read the name from the
    settings, so an own-table model goes through the same code under its own name."""
    return settings.model_copy(update={"mlflow": settings.mlflow.model_copy(
        update={"registered_model": registered_model})})


def compare_with_champion(settings: Settings, challenger: Lineage, frame: pd.DataFrame,
                          y: np.ndarray) -> ChampionComparison | None:
    """The champion measured on the challenger's test rows `frame` when the two can be compared on them
    (`models.gates.comparison_basis`); None without a champion."""
    from sklearn.metrics import roc_auc_score

    champion = load_registered(settings, CHAMPION)
    if champion is None:
        return None
    run = MlflowClient(settings.tracking_uri).get_run(champion.run_id)
    missing = [f for f in champion.model.feature_names if f not in frame.columns]
    comparable, basis = comparison_basis(Lineage.from_run(run.data.tags, run.data.params), challenger, missing)
    auc = float(roc_auc_score(y, champion.model.predict_pd(frame))) if comparable else None
    if not comparable:
        log.warning("%s v%s not compared with the new version: %s", settings.mlflow.registered_model,
                    champion.version, basis)
    return ChampionComparison(champion.version, auc, basis)


def apply_decision(settings: Settings, version: str, decision: GateDecision) -> None:
    """The new version becomes the challenger, and the champion too when the gates passed."""
    client, name = MlflowClient(settings.tracking_uri), settings.mlflow.registered_model
    client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, "gate_decision", "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(name, version, "gate_reasons", "; ".join(decision.reasons))
    client.set_model_version_tag(name, version, "gate_comparison", decision.comparison)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info("version %s: %s", version, "champion" if decision.promote else "challenger only")


def promote(settings: Settings, version: str, reason: str, user: str | None = None) -> None:
    """Manual override: make `version` the champion, recording who, when and why on the version."""
    if not reason.strip():
        raise ScfriskError("a manual promotion needs a --reason")
    client, name = configure_mlflow(settings), settings.mlflow.registered_model
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise ScfriskError(f"registered model '{name}' has no version {version}") from None
    client.set_registered_model_alias(name, CHAMPION, version)
    tags = {"promotion": "manual", "promoted_by": user or getpass.getuser(),
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"), "promotion_reason": reason}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
