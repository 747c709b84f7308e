"""`scfrisk train`: split -> train -> evaluate -> log and register in MLflow -> champion/challenger gate.

Two entry points share one run: the feature store (labels from the raw store's loans, point-in-time
features) and any feature table (`--table`). The Prefect flows are thin shells over `run_training`.
A model of the feature store is the platform's (`[mlflow].registered_model`, used by limits and the
service); a model of one's own table is registered under a name of its own and never competes with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from pandas.core.util.hashing import combine_hash_arrays  # how hash_pandas_object joins columns
from prefect import flow

from core.errors import ScfriskError
from core.files import read_frame
from core.settings import Settings
from explanation.reason_codes import REFERENCES_KEY, reference_values
from models.evaluation import GROUP_COLUMNS, Evaluation, evaluate_model
from models.gates import (
    MODEL_KIND_TAG,
    SPLIT_KIND_TAG,
    GateDecision,
    Lineage,
    ModelKind,
    SplitKind,
    decide_promotion,
)
from models.master_scale import load_master_scale
from models.registry import (
    apply_decision,
    compare_with_champion,
    configure_mlflow,
    log_pd_model,
    model_settings,
)
from models.splits import split_summary, stratified_split, time_split
from models.training import TrainingResult, binary_target, infer_features, rows_of, train_pd_model
from pipelines.compute import dask_client, run_partitions, worker_count
from pipelines.report import write_risk_report
from reporting.model_card import render_model_card
from reporting.plots import calibration_plot, ks_plot, roc_plot, score_distribution_plot

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

ENGINE_TAG, ENGINE_REASON_TAG = "training_engine", "training_engine_reason"
"""MLflow tags of the run: where the boosters were fitted (`local`, or `dask`: LightGBM's data-parallel learner on the
flow's Dask workers), and why."""
STRATIFIED_FRACTIONS = (0.2, 0.2)
"""(validation, test) shares of a table without a time column."""
METRICS_OUT_KEYS = {"auc": "test_auc", "gini": "test_gini", "ks": "test_ks", "brier": "test_brier",
                    "ece": "test_ece", "n_test": "test_n", "baseline_auc": "baseline_auc"}
TABLE_MODEL_PREFIX = "scfrisk-table-"
"""Registered name of an own-table model without `--model-name`: the prefix and the table file's stem."""
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    model_name: str
    version: str
    decision: GateDecision
    metrics: dict[str, float]
    split: pd.DataFrame
    split_kind: SplitKind

    def describe(self) -> str:
        m = self.metrics
        test = "OOT" if self.split_kind == "out_of_time" else "test"
        lines = [f"{self.model_name} version {self.version} (run {self.run_id}): {test} AUC {m['test_auc']:.4f} "
                 f"(baseline {m['baseline_auc']:.4f}), ECE {m['test_ece']:.4f}, PSI {m['score_psi']:.4f}; "
                 f"{'promoted to champion' if self.decision.promote else 'challenger only'}",
                 *self.decision.reasons]
        if "oracle_auc" in m:
            lines.append(f"true PD (simulator oracle) on the {test} rows: AUC {m['oracle_auc']:.4f}, the model's "
                         f"gap to it {m['auc_gap_to_oracle']:+.4f}; Brier {m['oracle_brier']:.4f}, gap "
                         f"{m['brier_gap_to_oracle']:+.4f}")
        return "\n  ".join(lines)


def table_model_name(table: Path | str, model_name: str | None = None) -> str:
    """The registered model of an own-table run: `model_name`, or derived from the table's file name."""
    return model_name or TABLE_MODEL_PREFIX + re.sub(r"[^a-z0-9_]+", "-", Path(table).stem.lower()).strip("-")


def check_table_model_name(settings: Settings, name: str) -> str:
    """Refuse a name MLflow would mangle, and the platform's model, which limits and the service use."""
    if not MODEL_NAME.fullmatch(name):
        raise ScfriskError(f"--model-name '{name}': use letters, digits, '.', '_' or '-' (at most 100)")
    if name == settings.mlflow.registered_model:
        raise ScfriskError(f"--model-name '{name}' is the platform's model ([mlflow].registered_model), which "
                           "limits and the service use; a model of your own table needs a name of its own")
    return name


def read_table(path: Path | str) -> pd.DataFrame:
    """A `--table`: CSV cells kept as text, their kinds inferred later."""
    return read_frame(path, "table", as_text=True)


def _require_columns(frame: pd.DataFrame, columns: dict[str, str | None], table: str) -> None:
    for role, name in columns.items():
        if name is not None and name not in frame.columns:
            raise ScfriskError(f"{role} column '{name}' is not in {table}; columns present: "
                               f"{', '.join(map(str, frame.columns))}")


def data_hash(frame: pd.DataFrame) -> str:
    """Fingerprint of the training data snapshot: same rows and values, same hash.

    The value of `hash_pandas_object(frame.astype(str), index=False)`, one column's text at a time: the whole
    frame as text is several times the frame (1.2 GB at 100M orders), one column of it is not."""
    hashes = (pd.util.hash_pandas_object(column.astype(str), index=False).to_numpy() for _, column in frame.items())
    hashed = combine_hash_arrays(hashes, frame.shape[1], len(frame))
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def assign_slices(frame: pd.DataFrame, y: pd.Series, time_col: str | None, has_test_table: bool,
                  settings: Settings) -> pd.Series:
    """Out of time when there is a time column; a given test table is the test slice as is."""
    n_test = int((frame["__source"] == "test_table").sum()) if has_test_table else 0
    own = frame.index[: len(frame) - n_test]
    if time_col is not None:
        slices = time_split(frame.loc[own, time_col], settings.model.valid_months,
                            0 if has_test_table else settings.model.test_months)
    else:
        valid_frac, test_frac = STRATIFIED_FRACTIONS
        slices = stratified_split(y[own], valid_frac, 0.0 if has_test_table else test_frac, settings.seed)
    return pd.concat([slices, pd.Series("test", index=frame.index[len(own):], name="slice")])


def training_engine(settings: Settings, rows: int, client: Client | None) -> tuple[str, str]:
    """Where the boosters fit (`dask`: data-parallel on the flow's cluster, or `local` in this process), and why:
    on the dask engine, only a training set larger than `[compute] train_in_memory_rows` is worth spreading
    (below it, one process fits faster than workers that exchange histograms every split)."""
    limit = settings.compute.train_in_memory_rows
    if client is None:
        return "local", f"engine '{settings.compute.engine}': {rows:,} rows trained in this process"
    if rows <= limit:
        return "local", f"{rows:,} rows <= [compute] train_in_memory_rows {limit:,}: gathered, trained in this process"
    workers = worker_count(client)
    return "dask", (f"{rows:,} rows > [compute] train_in_memory_rows {limit:,}: LightGBM data-parallel on "
                    f"{workers} Dask workers")


def run_training(settings: Settings, frame: pd.DataFrame, target: str, *, time_col: str | None = None,
                 id_col: str | None = None, test_frame: pd.DataFrame | None = None,
                 directions: dict[str, int] | None = None, kinds: dict[str, str] | None = None,
                 exclude: tuple[str, ...] = (), true_pd: pd.Series | None = None, source: str = "table",
                 feature_set_version: str = "table", model_name: str | None = None,
                 raw_snapshot_id: str | None = None) -> TrainOutcome:
    """Train, evaluate, log, register and gate one model on a labelled table (plus an optional test table).

    With `model_name` (see `table_model_name`) the model is an own table's, registered under that name and
    gated against that name's champion only; without it, the platform's (`[mlflow].registered_model`).
    """
    kind: ModelKind = "platform" if model_name is None else "table"
    if model_name is not None:
        settings = model_settings(settings, check_table_model_name(settings, model_name))
    _require_columns(frame, {"target": target, "time": time_col, "id": id_col}, source)
    if test_frame is not None:
        _require_columns(test_frame, {"target": target, "time": time_col}, "the test table")
    parts = [frame.assign(__source="table")]
    if test_frame is not None:
        parts.append(test_frame.assign(__source="test_table"))
    data = pd.concat(parts, ignore_index=True)
    if true_pd is not None:
        true_pd = pd.Series(true_pd.to_numpy(), index=data.index[: len(true_pd)])
    y = binary_target(data[target])
    if time_col is not None:
        data[time_col] = pd.to_datetime(data[time_col], errors="coerce")
    slices = assign_slices(data, y, time_col, test_frame is not None, settings)
    drop = {target, "__source", *(c for c in (time_col, id_col) if c), *exclude}
    features = infer_features(data[slices == "train"], drop, directions, kinds)
    scale = load_master_scale(settings.policy_file)
    client = dask_client()
    engine, why = training_engine(settings, int((slices != "test").sum()), client)
    log.info("training on %s: %s", engine, why)
    result = train_pd_model(data, y, slices, features, seed=settings.seed, max_rounds=settings.model.max_rounds,
                            search_trials=settings.model.search_trials, threads=settings.model.threads,
                            master_scale=scale, client=client if engine == "dask" else None)
    result.extras.update({ENGINE_TAG: engine, ENGINE_REASON_TAG: why})
    groups = [c for c in GROUP_COLUMNS if c in data.columns and c != target]
    inputs = result.model.prepare(data)  # once: the baseline, the evaluation and the references share it
    baseline_pd = result.baseline.predict_pd(inputs)
    evaluation = evaluate_model(result.model, baseline_pd, data, y, slices, groups, true_pd,
                                settings.gates.min_grade_count, settings.gates.grade_tolerance_z, inputs=inputs)
    split = split_summary(slices, y, data[time_col] if time_col else None)
    train, test = (slices == "train").to_numpy(), (slices == "test").to_numpy()
    split_kind: SplitKind = "test_table" if test_frame is not None else "out_of_time" if time_col else "random"
    all_rows = data_hash(data)
    lineage = Lineage(feature_set_version, all_rows, data_hash(rows_of(data, test)), split.loc["valid"].get("end"),
                      split.loc["test"].get("start"), raw_snapshot_id or all_rows)
    result.model.metadata = {
        "feature_set_version": feature_set_version, "source": source, "data_hash": all_rows,
        "raw_snapshot_id": raw_snapshot_id, MODEL_KIND_TAG: kind, SPLIT_KIND_TAG: split_kind,
        "trained_on": split.to_dict(orient="index"),
        REFERENCES_KEY: reference_values(rows_of(inputs, train), evaluation.scored.loc[train, "pd"]),
    }
    del inputs
    return _log_and_gate(settings, data, y, slices, result, evaluation, split, source, time_col, lineage)


def _log_and_gate(settings: Settings, data: pd.DataFrame, y: pd.Series, slices: pd.Series, result: TrainingResult,
                  evaluation: Evaluation, split: pd.DataFrame, source: str, time_col: str | None,
                  lineage: Lineage) -> TrainOutcome:
    model, metrics = result.model, evaluation.metrics
    configure_mlflow(settings)
    test = (slices == "test").to_numpy()
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mlflow.set_tags({"feature_set_version": lineage.feature_set_version, "source": source,
                         "data_hash": lineage.data_hash, "test_rows_hash": lineage.test_rows_hash,
                         MODEL_KIND_TAG: model.metadata[MODEL_KIND_TAG],
                         SPLIT_KIND_TAG: model.metadata[SPLIT_KIND_TAG], "git_commit": git_commit() or "none",
                         "calibration": model.calibrator.method, **result.extras})
        if model.metadata["raw_snapshot_id"]:
            mlflow.set_tag("raw_snapshot_id", model.metadata["raw_snapshot_id"])
        mlflow.log_params({**{f"lgb_{k}": v for k, v in result.params.items()}, "seed": settings.seed,
                           "valid_months": settings.model.valid_months, "test_months": settings.model.test_months,
                           "search_trials": settings.model.search_trials, "n_features": len(model.features),
                           "calibration": model.calibrator.method})
        for name, row in split.iterrows():
            mlflow.log_params({f"split_{name}_{k}": v for k, v in row.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_metrics({f"calibration_cv_log_loss_{k}": v for k, v in result.calibration_scores.items()})
        mlflow.log_dict(split.reset_index().to_dict(orient="records"), "split.json")
        mlflow.log_dict({"features": [f.__dict__ for f in model.features]}, "features.json")
        mlflow.log_table(result.search_log, "search.json")
        mlflow.log_table(evaluation.by_group, "metrics_by_group.json")
        if not evaluation.grades.empty:
            mlflow.log_table(evaluation.grades, "grades.json")
        scored = evaluation.scored
        y_test, pd_test = scored.loc[test, "y"].to_numpy(), scored.loc[test, "pd"].to_numpy()
        for path in (roc_plot(y_test, {"LightGBM": pd_test, "logistic baseline": scored.loc[test, "baseline_pd"]
                                       .to_numpy()}, out / "roc.png"),
                     ks_plot(y_test, pd_test, out / "ks.png"),
                     calibration_plot(y_test, pd_test, out / "calibration.png"),
                     score_distribution_plot({s: scored.loc[(slices == s).to_numpy(), "pd"].to_numpy()
                                              for s in ("train", "valid", "test")}, out / "score_distribution.png")):
            mlflow.log_artifact(str(path), "plots")
        version = log_pd_model(model, data.loc[test], settings.mlflow.registered_model)
        champion = compare_with_champion(settings, lineage, data.loc[test], y_test)
        decision = decide_promotion(metrics["test_auc"], metrics["test_ece"], metrics["score_psi"],
                                    bool(metrics.get("grades_monotone", 1.0)), champion, settings.gates)
        apply_decision(settings, version, decision)
        mlflow.set_tags({"gate_decision": "promoted" if decision.promote else "rejected",
                         "registered_model": settings.mlflow.registered_model, "registered_version": version})
        mlflow.log_dict({**decision.as_dict(), "version": version, "champion_version": champion and champion.version,
                         "champion_auc": champion and champion.auc}, "gate_decision.json")
        card = render_model_card(f"{settings.mlflow.registered_model} v{version}", model, split, evaluation,
                                 decision, source)
        mlflow.log_text(card, "model_card.md")
        write_risk_report(settings, model, data.assign(y=y, slice=slices), version, run_id=run.info.run_id,
                          decision=decision, time_col=time_col, source=source)
    outcome = TrainOutcome(run.info.run_id, settings.mlflow.registered_model, version, decision, metrics, split,
                           model.metadata[SPLIT_KIND_TAG])
    log.info(outcome.describe())
    return outcome


def write_metrics(outcome: TrainOutcome, path: Path | str) -> Path:
    """The test metrics JSON of `--metrics-out`."""
    m = outcome.metrics
    payload = {key: m[name] for key, name in METRICS_OUT_KEYS.items()}
    payload["n_test"] = int(payload["n_test"])
    # The final booster learns from train + valid (`train_pd_model` refits on both).
    payload["n_train"] = int(outcome.split.loc[["train", "valid"], "rows"].sum())
    payload.update(registered_model=outcome.model_name, version=outcome.version, run_id=outcome.run_id,
                   promoted=outcome.decision.promote)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


@flow(name="train-table")
def train_table_flow(settings: Settings, table: str, target: str, time_col: str | None = None,
                     id_col: str | None = None, test_table: str | None = None,
                     metrics_out: str | None = None, model_name: str | None = None) -> TrainOutcome:
    """Prefect shell of `scfrisk train --table`: registered as `model_name`, or a name derived from the table."""
    outcome = run_training(settings, read_table(table), target, time_col=time_col, id_col=id_col,
                           test_frame=read_table(test_table) if test_table else None, source=str(table),
                           model_name=table_model_name(table, model_name))
    if metrics_out:
        write_metrics(outcome, metrics_out)
    return outcome


def oracle_pd(oracle_dir: Path | str, loan_ids: pd.Series) -> pd.Series:
    """The simulator's true PD of each loan (NaN where unknown), aligned with `loan_ids`."""
    path = Path(oracle_dir) / "oracle" / "loans"
    if not path.exists():
        raise ScfriskError(f"no simulator oracle at {path}; pass the folder `scfrisk simulate --out` wrote")
    truth = pd.read_parquet(path, columns=["loan_id", "true_pd"]).set_index("loan_id")["true_pd"]
    return pd.Series(loan_ids.map(truth).to_numpy(dtype=float), index=loan_ids.index, name="true_pd")


@flow(name="train")
def train_flow(settings: Settings, oracle: str | None = None, metrics_out: str | None = None) -> TrainOutcome:
    """Prefect shell of `scfrisk train`: feature store -> train -> evaluate -> register -> gate."""
    from core.raw_store import RawStore
    from features.catalogue import PROTECTED_PROXIES
    from features.definitions import FEATURES, feature_set_version
    from features.offline_store import ENTITY_COLUMNS, training_frame

    frame = training_frame(settings, run_partitions)  # the flow's engine, as `features build` builds it
    outcome = run_training(
        settings, frame, "defaulted", time_col="as_of", id_col="application_id",
        directions={f.name: f.direction for f in FEATURES}, kinds={f.name: f.kind for f in FEATURES},
        exclude=(*(c for c in ENTITY_COLUMNS if c not in ("defaulted", "as_of", "application_id")),
                 *PROTECTED_PROXIES),  # a possible proxy of a protected attribute is never a model input
        true_pd=oracle_pd(oracle, frame["loan_id"]) if oracle else None,
        source=f"feature store {settings.store_url('raw_store')}", feature_set_version=feature_set_version(),
        raw_snapshot_id=RawStore.from_settings(settings).snapshot_id,
    )
    if metrics_out:
        write_metrics(outcome, metrics_out)
    return outcome
