"""MLflow run contents, champion/challenger gates, manual promotion and `scfrisk train --table`, on a real
SQLite tracking store in the test's workspace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from core.errors import ScfriskError
from core.settings import GatesConfig, Settings
from models.gates import ChampionComparison, Lineage, comparison_basis, decide_promotion
from models.pd_model import PDModel
from models.registry import CHALLENGER, CHAMPION, load_pd_model, load_registered, model_settings, promote
from pipelines.cli import app
from pipelines.train import assign_slices, run_training
from testkit.synthetic import DIRECTIONS, synthetic_applications
from tests.conftest import REPO

STRONG = ["refund_rate_90d", "late_settlement_share", "complaints_90d", "months_on_platform", "rating_avg"]
FAST = {"max_rounds": 150, "search_trials": 1, "valid_months": 4, "test_months": 4}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite file (creating one costs seconds; copying it costs nothing)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def _workspace(root: Path, empty_store: Path) -> Settings:
    settings = Settings(home=root, policy_file=REPO / "policy.toml", model=FAST, gates={"max_ece": 0.05})
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, settings.home_dir / "mlflow.db")
    return settings


@pytest.fixture(scope="module")
def history(tmp_path_factory, empty_store):
    """Three runs on one table (the same test rows): a weak first model, a better one, then a weak one again."""
    settings = _workspace(tmp_path_factory.mktemp("ws"), empty_store)
    frame = synthetic_applications(4000, seed=21)
    table = frame.drop(columns="true_pd")

    def train(columns_unused: list[str]):
        return run_training(settings, table, "defaulted", time_col="applied_at", id_col="application_id",
                            directions=DIRECTIONS, exclude=tuple(columns_unused), true_pd=frame["true_pd"],
                            model_name="loans")

    return model_settings(settings, "loans"), frame, [train(STRONG), train([]), train(STRONG)]


def test_better_challenger_is_promoted_and_worse_one_is_not(history):
    settings, _, (weak, strong, weak_again) = history
    assert weak.decision.promote  # first model: no champion to beat
    assert strong.decision.promote and strong.metrics["test_auc"] > weak.metrics["test_auc"] + 0.02
    assert not weak_again.decision.promote
    assert any(r.startswith(f"fail: test AUC {weak_again.metrics['test_auc']:.4f} vs champion v{strong.version}")
               for r in weak_again.decision.reasons)
    assert weak_again.decision.comparison.startswith("same data snapshot")
    assert "same data snapshot" in weak_again.decision.reasons[0]
    client = MlflowClient()
    name = settings.mlflow.registered_model
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == strong.version
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == weak_again.version
    assert client.get_run(weak_again.run_id).data.tags["gate_decision"] == "rejected"
    decision = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=weak_again.run_id, artifact_path="gate_decision.json")).read_text())
    assert decision["promote"] is False and decision["champion_auc"] == pytest.approx(strong.metrics["test_auc"])
    assert decision["champion_version"] == strong.version


def test_run_holds_params_metrics_artifacts_and_the_pd_pyfunc(history):
    settings, frame, (_, strong, _) = history
    run = MlflowClient().get_run(strong.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert {"lgb_num_leaves", "lgb_rounds", "seed", "calibration", "split_train_rows",
            "split_test_start"} <= set(params)
    assert params["split_test_rows"] == str(strong.split.loc["test", "rows"])
    assert {"test_auc", "test_ece", "test_ks", "baseline_auc", "score_psi", "oracle_auc",
            "auc_gap_to_oracle"} <= set(metrics)
    assert "\n  true PD (simulator oracle) on the OOT rows: AUC " in strong.describe()  # `train --oracle` prints it
    assert len(tags["data_hash"]) == 16 and tags["feature_set_version"] == "table" and "git_commit" in tags
    assert (tags["model_kind"], tags["split_kind"], tags["registered_model"]) == ("table", "out_of_time", "loans")
    artifacts = {a.path for a in MlflowClient().list_artifacts(strong.run_id)}
    assert {"model_card.md", "gate_decision.json", "features.json", "split.json", "plots"} <= artifacts
    plots = {Path(a.path).name for a in MlflowClient().list_artifacts(strong.run_id, "plots")}
    assert plots == {"roc.png", "ks.png", "calibration.png", "score_distribution.png"}
    card = Path(mlflow.artifacts.download_artifacts(run_id=strong.run_id, artifact_path="model_card.md")).read_text()
    assert "## Limitations" in card and "out-of-time" in card.lower()
    assert run.info.artifact_uri.startswith(settings.path("mlflow_artifacts").as_uri())

    pyfunc = mlflow.pyfunc.load_model(f"models:/{settings.mlflow.registered_model}@{CHAMPION}")
    champion = load_pd_model(settings)
    sample = frame.head(50)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(sample)), champion.predict_pd(sample))
    assert isinstance(champion, PDModel) and champion.master_scale is not None


def test_manual_promotion_is_recorded_on_the_version(history):
    settings, _, (_, _, weak_again) = history
    promote(settings, weak_again.version, "regulator asked for the simpler model", user="risk-officer")
    client, name = MlflowClient(), settings.mlflow.registered_model
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == weak_again.version
    tags = client.get_model_version(name, weak_again.version).tags
    assert tags["promoted_by"] == "risk-officer" and tags["promotion"] == "manual"
    assert tags["promotion_reason"] == "regulator asked for the simpler model" and tags["promoted_at"]
    with pytest.raises(ScfriskError, match="has no version 99"):
        promote(settings, "99", "typo")


def test_champion_is_read_once_as_the_version_the_alias_names_after_promotion_and_rollback(history):
    """Model, version number and run come from one read of the alias, whichever version it names now."""
    settings, frame, (_, strong, weak_again) = history
    name, sample = settings.mlflow.registered_model, frame.head(50)
    for trained in (strong, weak_again):  # roll back to the better model, then promote the weak one again
        promote(settings, trained.version, "rollback drill", user="risk-officer")
        found = load_registered(settings, CHAMPION)
        assert (found.version, found.run_id) == (trained.version, trained.run_id)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{trained.version}")
        np.testing.assert_allclose(found.model.predict_pd(sample), np.asarray(pyfunc.predict(sample)))
    assert load_registered(settings, "no-such-alias") is None


def test_champion_whose_files_are_gone_is_refused_in_one_line(history):
    settings, _, _ = history
    found = load_registered(settings, CHAMPION)
    uri = MlflowClient(settings.tracking_uri).get_model_version_download_uri(settings.mlflow.registered_model,
                                                                             found.version)
    files = Path(urlparse(uri).path)
    aside = files.with_name("moved-away")
    files.rename(aside)
    try:
        with pytest.raises(ScfriskError, match=rf"^registered model 'loans' v{found.version} \(champion\): its "
                                               rf"files at {uri}/artifacts/pd_model cannot be read \(.+\); restore "
                                               "the workspace's artifact store"):
            load_registered(settings, CHAMPION)
    finally:
        aside.rename(files)


def test_gates_need_every_check():
    gates = GatesConfig(auc_tolerance=0.01, max_ece=0.02, max_score_psi=0.25)
    champion = ChampionComparison("3", 0.805, "same data snapshot s1 and the same test rows")
    assert decide_promotion(0.80, 0.01, 0.05, True, champion, gates).promote
    assert not decide_promotion(0.79, 0.01, 0.05, True, champion, gates).promote
    assert not decide_promotion(0.85, 0.03, 0.05, True, champion, gates).promote
    assert not decide_promotion(0.85, 0.01, 0.30, True, champion, gates).promote
    assert not decide_promotion(0.85, 0.01, 0.05, False, None, gates).promote
    refused = decide_promotion(0.99, 0.01, 0.05, True, ChampionComparison("3", None, "feature sets differ"), gates)
    assert not refused.promote and refused.comparison == "feature sets differ"
    assert refused.reasons[0].startswith("fail: not compared with champion v3: feature sets differ")


PLATFORM = Lineage("fs1", "d1", "t1", trained_until="2025-06-30", test_from="2025-07-01", snapshot="s1")


@pytest.mark.parametrize(("challenger", "missing", "comparable", "why"), [
    (PLATFORM, [], True, "same data snapshot s1 and the same test rows"),
    # The data grew: the champion is re-scored on the newer test rows, which it never learnt from.
    (Lineage("fs1", "d2", "t2", "2025-09-30", "2025-10-01", "s2"), [], True,
     "champion re-scored on the challenger's test rows from 2025-10-01 (snapshot s2), after its own training "
     "ended 2025-06-30"),
    (Lineage("fs1", "d2", "t2", "2025-03-31", "2025-04-01", "s2"), [], False,
     "the champion learnt from rows up to 2025-06-30, on or after the challenger's first test row (2025-04-01)"),
    (Lineage("fs2", "d1", "t1", "2025-06-30", "2025-07-01", "s1"), [], False,
     "feature sets differ (champion 'fs1', challenger 'fs2')"),
    (Lineage("table", "d9", "t9", None, None, "d9"), [], False,
     "feature sets differ (champion 'fs1', challenger 'table')"),
    (PLATFORM, ["gmv_90d"], False, "the challenger's test rows lack 1 of the champion's inputs (gmv_90d)"),
    (Lineage("fs1", "d2", "t2", None, None, "d2"), [], False,
     "different data snapshots (s1 vs d2) without a time split: the champion may have learnt from the "
     "challenger's test rows"),
])
def test_the_champion_is_measured_only_on_test_rows_it_never_learnt_from(challenger, missing, comparable, why):
    assert comparison_basis(PLATFORM, challenger, missing) == (comparable, why)


def test_test_table_rows_are_the_test_slice_and_never_train(tmp_path):
    frame = pd.DataFrame({"__source": ["table"] * 100 + ["test_table"] * 30})
    y = pd.Series(np.tile([0, 1], 65))
    slices = assign_slices(frame, y, None, True, Settings(home=tmp_path))
    assert (slices.iloc[100:] == "test").all() and set(slices.iloc[:100]) == {"train", "valid"}


def _csv_table(path: Path) -> Path:
    frame = synthetic_applications(3000, seed=5).drop(columns=["true_pd", "applied_at"])
    frame["defaulted"] = np.where(frame["defaulted"] == 1, "bad", "good")
    frame.loc[::7, "rating_avg"] = np.nan
    frame.loc[::11, "region"] = "NA"
    frame.to_csv(path, index=False, na_rep="")
    return path


def test_cli_trains_on_a_csv_table_and_writes_metrics(tmp_path, empty_store, monkeypatch, prefect_server):
    settings = _workspace(tmp_path / "home", empty_store)
    monkeypatch.setenv("SCFRISK_HOME", str(settings.home_dir))
    monkeypatch.setenv("SCFRISK_MODEL__MAX_ROUNDS", "150")
    monkeypatch.setenv("SCFRISK_MODEL__SEARCH_TRIALS", "1")
    table, out = _csv_table(tmp_path / "loans.csv"), tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["train", "--table", str(table), "--target", "defaulted", "--id-col",
                                      "application_id", "--metrics-out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert {"auc", "gini", "ks", "brier", "ece", "n_train", "n_test", "baseline_auc"} <= set(metrics)
    assert metrics["n_test"] == 600 and metrics["n_train"] == 2400  # train + valid: what the booster learnt from
    assert metrics["auc"] > 0.75 and metrics["gini"] == pytest.approx(2 * metrics["auc"] - 1)
    # The risk report is written for a bring-your-own table too, its reasons worded from the column names.
    assert metrics["registered_model"] == "scfrisk-table-loans"
    report = (settings.path("reports") / f"risk_report_scfrisk-table-loans_v{metrics['version']}.html").read_text()
    assert "Column &#x27;" in report or "Column '" in report
    # Its model card speaks of the table and its random split, not of merchants or an out-of-time test.
    run_id = MlflowClient(settings.tracking_uri).get_model_version("scfrisk-table-loans", metrics["version"]).run_id
    card = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model_card.md",
                                                    tracking_uri=settings.tracking_uri)).read_text()
    assert "## Performance (random test split)" in card and "target column of the source table" in card
    assert "out-of-time" not in card.lower() and "merchant's credit application" not in card


def test_cli_names_a_missing_target_column_and_the_columns_present(tmp_path, monkeypatch, prefect_server):
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    table = _csv_table(tmp_path / "loans.csv")
    result = CliRunner().invoke(app, ["train", "--table", str(table), "--target", "is_bad"])
    assert isinstance(result.exception, ScfriskError)
    assert "target column 'is_bad' is not in" in str(result.exception)
    assert "columns present: application_id, merchant_type" in str(result.exception)


GERMAN = REPO / "data_samples" / "public" / "german_credit.parquet"
LAX = {"max_ece": 0.5, "max_score_psi": 5.0, "require_monotone_grades": False}
"""Gates every model passes: these tests are about which models are compared, not how good they are."""


def test_own_table_in_a_platform_workspace_never_touches_the_platform_champion(tmp_path, empty_store, monkeypatch,
                                                                               prefect_server):
    settings = _workspace(tmp_path / "home", empty_store).model_copy(update={"gates": GatesConfig(**LAX)})
    platform = run_training(settings, synthetic_applications(2000, seed=3).drop(columns="true_pd"), "defaulted",
                            time_col="applied_at", id_col="application_id", feature_set_version="fs-platform")
    monkeypatch.setenv("SCFRISK_HOME", str(settings.home_dir))
    monkeypatch.setenv("SCFRISK_MODEL__MAX_ROUNDS", "150")
    monkeypatch.setenv("SCFRISK_MODEL__SEARCH_TRIALS", "1")
    for gate, value in LAX.items():
        monkeypatch.setenv(f"SCFRISK_GATES__{gate.upper()}", str(value).lower())
    result = CliRunner().invoke(app, ["train", "--table", str(GERMAN), "--target", "creditability"])
    assert result.exit_code == 0, result.output
    assert "scfrisk-table-german_credit version 1" in result.output and "test AUC" in result.output
    client, name = MlflowClient(), settings.mlflow.registered_model
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [platform.version]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == platform.version
    own = client.get_model_version_by_alias("scfrisk-table-german_credit", CHAMPION)
    tags = client.get_run(own.run_id).data.tags
    assert (tags["model_kind"], tags["split_kind"]) == ("table", "random")

    refused = CliRunner().invoke(app, ["train", "--table", str(GERMAN), "--target", "creditability",
                                       "--model-name", name])
    assert isinstance(refused.exception, ScfriskError)
    assert "--model-name 'scfrisk-pd' is the platform's model" in str(refused.exception)


def test_a_challenger_on_other_rows_or_features_stays_challenger_with_the_reason(tmp_path, empty_store):
    settings = _workspace(tmp_path / "home", empty_store).model_copy(update={"gates": GatesConfig(**LAX)})
    german = pd.read_parquet(GERMAN)

    def train(frame: pd.DataFrame, feature_set: str = "table"):
        return run_training(settings, frame, "creditability", feature_set_version=feature_set, model_name="german")

    first, fewer, other = train(german), train(german.iloc[50:]), train(german, feature_set="german-v2")
    assert first.decision.promote
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("german", CHAMPION).version) == first.version
    for outcome, why in ((fewer, "different data snapshots"), (other, "feature sets differ")):
        assert not outcome.decision.promote and outcome.decision.comparison.startswith(why)
        assert outcome.decision.reasons[0].startswith("fail: not compared with champion v")
        assert client.get_model_version("german", outcome.version).tags["gate_comparison"].startswith(why)
        assert "fail: not compared with champion v" in outcome.describe()


def test_limits_refuse_a_champion_whose_inputs_are_not_in_the_feature_set(tmp_path, empty_store, monkeypatch,
                                                                          prefect_server):
    from tests.rawdata import write_raw_store
    from tests.test_features import TABLES

    settings = _workspace(tmp_path / "home", empty_store)
    write_raw_store(settings.path("raw_store"), TABLES)
    # A workspace where a model of another table became the platform's champion (as `train --table` did).
    foreign = run_training(settings, pd.read_parquet(GERMAN), "creditability")
    promote(settings, foreign.version, "a mistake")
    monkeypatch.setenv("SCFRISK_HOME", str(settings.home_dir))
    result = CliRunner().invoke(app, ["limits"])
    assert isinstance(result.exception, ScfriskError)
    message = str(result.exception)
    assert f"champion scfrisk-pd v{foreign.version}" in message and "reads 20 input(s)" in message
    assert "credit_amount" in message and "\n" not in message
    assert not (settings.home_dir / "limits").exists()
