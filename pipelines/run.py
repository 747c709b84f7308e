"""`scfrisk run`: the whole pipeline as one Prefect flow, ending in a published bundle.

ingest -> validate -> features -> train -> evaluate -> explain -> limits -> gate -> publish. Each stage is
a flow of its own (also runnable alone from the CLI); this flow only chains them. A stage whose inputs
did not change is reused: ingest leaves an identical store untouched, the feature store keys its files by
raw snapshot and feature-set version, and training is skipped when a registered version was trained on the
same inputs and code (`training_fingerprint`). Any failing stage raises, so nothing after it runs and nothing is
published; the live bundle stays live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.deployments.runner import RunnerDeployment

from core.batch import require_tables
from core.raw_store import RawStore
from core.settings import Settings
from core.sources import open_source
from explanation.reason_codes import ReasonCodeIndex, population_reasons
from features.offline_store import OfflineStore
from pipelines.compute import on_engine, run_partitions
from pipelines.features import build_features_flow
from pipelines.ingest import ingest_flow
from pipelines.limits import champion, limits_flow, merchant_parts
from pipelines.publish import BundleParts, publish
from pipelines.runtime import scheduled

log = logging.getLogger(__name__)

FINGERPRINT_TAG = "scfrisk.training_fingerprint"


@dataclass(frozen=True)
class RunSummary:
    bundle_id: str
    snapshot_id: str
    feature_set_version: str
    trained_version: str | None
    champion_version: str
    report: Path
    limits: Path
    strategy: Path
    settings: Settings

    def describe(self) -> str:
        trained = (f"trained version {self.trained_version}" if self.trained_version
                   else "training reused (inputs unchanged)")
        s = self.settings
        return "\n".join([
            f"published bundle {self.bundle_id}: champion {s.mlflow.registered_model} v{self.champion_version} "
            f"({trained}), raw snapshot {self.snapshot_id}, feature set {self.feature_set_version}",
            f"  risk report:   {self.report}",
            f"  limits:        {self.limits}",
            f"  strategy:      {self.strategy}",
            f"  MLflow UI:     mlflow ui --backend-store-uri {s.tracking_uri}",
            "  serve it:      SCFRISK_API_KEYS=<key> scfrisk serve   (then POST /v1/score)",
        ])


TRAINING_CODE = ("features", "models", "pipelines/train.py")
"""The source a trained model depends on (relative to the project root); serving, docs and the other
stages can change without a retrain."""
TRAINING_LIBRARIES = ("lightgbm", "scikit-learn", "numpy", "pandas")


def training_code_version(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """Hash of the training code and the versions of the libraries that fit the model.

    A content hash rather than the git commit: it also covers uncommitted edits and installs without git,
    and a commit that touches nothing in `TRAINING_CODE` keeps the same version.
    """
    from importlib.metadata import version

    digest = hashlib.sha256()
    for part in TRAINING_CODE:
        path = root / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    digest.update(" ".join(f"{lib}=={version(lib)}" for lib in TRAINING_LIBRARIES).encode())
    return digest.hexdigest()[:16]


def training_fingerprint(settings: Settings, snapshot_id: str, feature_set_version: str) -> str:
    """Everything a trained model depends on: data snapshot, definitions, code, model and gate settings."""
    inputs = {
        "snapshot": snapshot_id,
        "features": feature_set_version,
        "code": training_code_version(),
        "seed": settings.seed,
        "model": settings.model.model_dump(mode="json"),
        "gates": settings.gates.model_dump(mode="json"),
        "policy": Path(settings.policy_file).read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@task(retries=2, retry_delay_seconds=5)
def trained_version_for(settings: Settings, fingerprint: str) -> str | None:
    """The registered version already trained on these inputs, if any (MLflow I/O: retried)."""
    from mlflow import MlflowClient

    from models.registry import configure_mlflow

    client: MlflowClient = configure_mlflow(settings)
    for version in client.search_model_versions(f"name = '{settings.mlflow.registered_model}'"):
        if client.get_run(version.run_id).data.tags.get(FINGERPRINT_TAG) == fingerprint:
            return str(version.version)
    return None


def _io_error(task: object, task_run: object, state: object) -> bool:
    return isinstance(state.result(raise_on_failure=False), OSError)  # type: ignore[attr-defined]


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_io_error)
def publish_bundle(parts: BundleParts, settings: Settings) -> str:
    """Build, check and switch in the bundle (filesystem I/O errors are retried; failed checks are not)."""
    return publish(parts, settings)


@flow(name="scfrisk-run", log_prints=False)
def run_flow(settings: Settings, source: str, oracle: str | None = None) -> RunSummary:
    """The monthly pipeline: from a batch of platform tables to a live, checked bundle."""
    from pipelines.report import report_file, report_for_version
    from pipelines.train import train_flow

    # The CLI checks this before it starts; a scheduled run (`monthly_deployment`) is checked here.
    batch = open_source(source, settings)
    require_tables("run", RawStore.from_settings(settings), batch.tables(), batch.description)
    ingested = on_engine(ingest_flow, settings)(source=source, settings=settings)
    snapshot_id = RawStore.from_settings(settings).snapshot_id or ""
    features = on_engine(build_features_flow, settings)(settings=settings)

    fingerprint = training_fingerprint(settings, snapshot_id, features.version)
    trained = None
    if trained_version_for(settings, fingerprint) is None:
        outcome = on_engine(train_flow, settings)(settings=settings, oracle=oracle)
        from mlflow import MlflowClient

        MlflowClient(settings.tracking_uri).set_tag(outcome.run_id, FINGERPRINT_TAG, fingerprint)
        trained = outcome.version
    else:
        log.info("training inputs unchanged (fingerprint %s): reusing the registered model", fingerprint)

    found = champion(settings)
    model, version = found.model, found.version
    report = report_file(settings, version)
    if not report.is_file():
        report = report_for_version(settings, version)
    limits = on_engine(limits_flow, settings)(settings=settings, as_of=features.online_as_of.to_pydatetime(),
                                              champion=found)  # one read of the alias: limits and bundle agree
    buckets = RawStore.from_settings(settings).buckets
    with tempfile.TemporaryDirectory() as tmp:
        online = OfflineStore.from_settings(settings).local_copy(features.online, Path(tmp))
        snapshot = pd.read_parquet(online)
        parts = BundleParts(
            model_dir=model.save(Path(tmp) / "model"),
            model_version=version,
            feature_set_version=features.version,
            features_as_of=features.online_as_of.isoformat(),
            online_features=online,
            limits=limits.path,
            reason_codes=ReasonCodeIndex.from_parts(
                run_partitions(partial(population_reasons, model), merchant_parts(snapshot, buckets), "reason codes"),
                model, version),
            policy_file=Path(settings.policy_file),
            risk_report=report,
        )
        bundle_id = publish_bundle(parts, settings)
    log.info("ingest: %s", ingested.describe())
    return RunSummary(bundle_id, snapshot_id, features.version, trained, version, report, limits.path,
                      limits.strategy, settings)


def monthly_deployment(settings: Settings, source: Path, cron: str = "0 3 1 * *") -> RunnerDeployment:
    """`scfrisk run` as a Prefect deployment on a cron schedule (served by `scfrisk schedule`; runs then
    show in the Prefect UI of the configured server)."""
    return scheduled(run_flow, "monthly", settings, source, cron, "0 3 1 * *")
