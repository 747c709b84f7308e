"""End to end on `data_samples/`: `scfrisk run` as a real Prefect flow (real GX, DuckDB, MLflow) with the
repository's own configuration, then `scfrisk serve` as its own process on loopback, scored over HTTP the
way the loan engine and `make demo` do it. The model's out-of-time quality on the sample is checked here
too, from what the run logged to MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket

import pandas as pd
import pytest

from core.rules import DataValidationError
from credit.policy import load_policy
from features.catalogue import PROTECTED_PROXIES
from pipelines.demo import _call, sample_requests, start_service
from serving.bundle import BUNDLES_DIR, POINTER
from tests.conftest import REPO, SAMPLE

KEY = "e2e-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def platform():
    return SAMPLE


@pytest.fixture(scope="module")
def pipeline(sample_run):
    """The session's `scfrisk run` on the sample (`sample_run`, with the repository's scfrisk.toml and policy)."""
    settings, first, _ = sample_run
    return settings, first


def test_model_on_the_sample_beats_baseline_and_chance_calibrated_with_monotone_grades(pipeline):
    from mlflow import MlflowClient

    settings, summary = pipeline
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(client.get_model_version(settings.mlflow.registered_model, summary.champion_version).run_id)
    m = run.data.metrics
    assert m["test_auc"] > m["baseline_auc"] + 0.02, "LightGBM must beat the logistic baseline out of time"
    assert m["test_auc"] > 0.70, "and be far from a random score (0.5)"
    assert m["test_ece"] < settings.gates.max_ece
    assert m["grades_monotone"] == 1.0
    assert m["oracle_auc"] - m["test_auc"] < 0.1, "the gap to the simulator's true PD stays bounded"


def test_run_publishes_a_checked_bundle_with_every_artefact(pipeline):
    settings, summary = pipeline
    published = settings.path("published")
    assert (published / POINTER).read_text().strip() == summary.bundle_id
    assert summary.trained_version == summary.champion_version == "1"
    assert summary.report.is_file() and "<html" in summary.report.read_text()[:500].lower()
    limits = pd.read_parquet(summary.limits)
    assert set(limits["product"]) == {"order_financing", "receivable_financing",
                                      "warehouse_receipt_financing", "microloan"}
    assert limits["pd"].between(0, 1).all() and (limits["limit"] >= 0).all()
    assert limits.loc[~limits["eligible"], "limit"].eq(0).all()
    # The shipped policy lends to the population it serves (it once found 14% of merchants eligible).
    merchants = limits.groupby("merchant_id")["eligible"].any()
    assert 0.40 <= merchants.mean() <= 0.80, f"{merchants.mean():.1%} of merchants eligible for some product"
    per_product = limits.groupby("product", observed=True)["eligible"].mean()
    assert per_product["order_financing"] >= 0.25 and per_product["microloan"] >= 0.25, per_product.to_dict()
    assert (limits["exclusion_reason"] == "sales").mean() <= 0.30, "the sales floor alone must not exclude most"
    # The strategy report shows the profit-maximising cut-off, on the book and on the out-of-time backtest.
    assert "cut-off" in summary.strategy.read_text().lower()
    best = pd.read_parquet(summary.strategy.parent.parent / "backtest" / "best_cutoffs.parquet")
    assert {"product", "cutoff_pd", "realised_profit"} <= set(best.columns) and len(best) >= 2


def test_rerun_on_unchanged_inputs_reuses_training(pipeline, platform):
    from pipelines.run import run_flow

    settings, first = pipeline
    again = run_flow(settings=settings, source=str(platform))
    assert again.trained_version is None
    assert again.champion_version == first.champion_version
    assert again.snapshot_id == first.snapshot_id
    assert again.bundle_id == first.bundle_id, "the same content is not published twice"


def test_a_run_reads_the_champion_once(pipeline, platform, monkeypatch):
    """`run` hands the champion it read to its limits step: one read of the alias, so its limits and its bundle
    are of one version (the limits flow read it again, and a promotion in between failed the run)."""
    import pipelines.limits
    from pipelines.run import run_flow

    settings, first = pipeline
    reads, read = [], pipelines.limits.load_registered
    monkeypatch.setattr(pipelines.limits, "load_registered", lambda *args: reads.append(args[1:]) or read(*args))
    again = run_flow(settings=settings, source=str(platform))
    assert reads == [("champion",)] and again.champion_version == first.champion_version


def test_a_failing_stage_publishes_nothing(pipeline, platform, tmp_path):
    from pipelines.run import run_flow

    settings, _ = pipeline
    live_before = (settings.path("published") / POINTER).read_text()
    bundles_before = sorted(p.name for p in (settings.path("published") / BUNDLES_DIR).iterdir())
    bad = tmp_path / "bad"
    shutil.copytree(platform, bad, ignore=shutil.ignore_patterns("oracle"))
    orders = pd.read_parquet(bad / "orders")
    orders.loc[orders.index[:3], "amount"] = -5.0
    shutil.rmtree(bad / "orders")
    orders.to_parquet(bad / "orders.parquet")
    with pytest.raises(DataValidationError, match=r"orders\.amount.*failed for 3 of"):
        run_flow(settings=settings, source=str(bad))
    assert (settings.path("published") / POINTER).read_text() == live_before
    assert sorted(p.name for p in (settings.path("published") / BUNDLES_DIR).iterdir()) == bundles_before


def test_live_service_answers_the_loan_engine_and_audits_it(pipeline, platform):
    settings, summary = pipeline
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pid, log_file = start_service(settings, port, KEY)
    try:
        requests = sample_requests(summary.limits, load_policy(settings.policy_file))
        answers = [_call(f"http://127.0.0.1:{port}/v1/score", KEY, r) for r in requests]
        # The demo's requests, picked from the data, show each kind of answer.
        assert [a["decision"]["outcome"] for a in answers] == ["approve", "counter_offer", "decline"]
        for request, answer in zip(requests, answers):
            assert answer["merchant_id"] == request["merchant_id"]
            assert answer["model_version"] == summary.champion_version
            assert 0 <= answer["pd"] <= 1 and answer["grade"]
            assert {x["product"] for x in answer["limits"]} == {"order_financing", "receivable_financing",
                                                                "warehouse_receipt_financing", "microloan"}
            assert answer["decision"]["outcome"] in {"approve", "counter_offer", "refer", "decline"}
            assert len(answer["reason_codes"]) <= 4
        # The declined merchant is told the rule that declined it first, then the factors, in plain words.
        rule, *factors = answers[-1]["reason_codes"]
        assert rule["source"] == "policy" and rule["description"] == answers[-1]["decision"]["reasons"][0]
        sides = (", higher than the typical", ", lower than the typical", ", unlike the typical")
        assert factors and all(r["source"] == "model" and any(s in r["description"] for s in sides)
                               for r in factors)
        assert not {r["code"] for a in answers for r in a["reason_codes"]} & set(PROTECTED_PROXIES)
        inputs = _call(f"http://127.0.0.1:{port}/v1/model", KEY)["inputs"]
        assert not set(inputs) & set(PROTECTED_PROXIES), "a possible proxy is no input of the platform model"
        limits = pd.read_parquet(summary.limits).set_index(["merchant_id", "product"])
        for x in answers[0]["limits"]:
            assert x["limit"] == pytest.approx(limits.loc[(answers[0]["merchant_id"], x["product"]), "limit"])
        audit = [json.loads(line) for line in settings.audit_log.read_text().splitlines()]
        assert [a["request_id"] for a in audit[-3:]] == [a["request_id"] for a in answers]
        # The same merchant sent as its raw records, as if it were new: features computed on demand as of
        # the online store's as_of give the online answer.
        request = min(requests, key=lambda r: len(_sample_records(platform, r["merchant_id"])["orders"]))
        online = answers[requests.index(request)]
        body = {**request, "records": _sample_records(platform, request["merchant_id"]),
                "as_of": online["features_as_of"]}
        fresh = _call(f"http://127.0.0.1:{port}/v1/score", KEY, body)
        assert fresh["scoring_mode"] == "records" and fresh["merchant_id"] == online["merchant_id"]
        assert fresh["pd"] == pytest.approx(online["pd"], abs=1e-9) and fresh["decision"] == online["decision"]
    finally:
        os.kill(pid, signal.SIGTERM)


def test_a_champion_of_another_table_is_refused_and_the_live_bundle_stays(pipeline, platform):
    from core.errors import ScfriskError
    from models.registry import promote
    from pipelines.run import run_flow
    from pipelines.train import run_training

    settings, first = pipeline
    live_before = (settings.path("published") / POINTER).read_text()
    bundles_before = sorted(p.name for p in (settings.path("published") / BUNDLES_DIR).iterdir())
    # Registered under the platform's name on purpose (`train --table` never does): its gate refuses to
    # compare it with the platform champion, and only a promotion by hand makes it the champion.
    foreign = run_training(settings, pd.read_parquet(REPO / "data_samples" / "public" / "german_credit.parquet"),
                           "creditability")
    assert not foreign.decision.promote and "feature sets differ" in foreign.decision.comparison
    promote(settings, foreign.version, "by mistake")
    try:
        with pytest.raises(ScfriskError, match=rf"champion scfrisk-pd v{foreign.version} .* reads 20 input\(s\)"):
            run_flow(settings=settings, source=str(platform))
    finally:
        promote(settings, first.champion_version, "back to the platform model")
    assert (settings.path("published") / POINTER).read_text() == live_before
    assert sorted(p.name for p in (settings.path("published") / BUNDLES_DIR).iterdir()) == bundles_before


def _sample_records(platform, merchant: str) -> dict[str, list[dict]]:
    """A merchant's rows of every table the features read, as JSON gives them."""
    import orjson
    import pyarrow.parquet as pq

    from features.on_demand import RECORD_TABLES

    return orjson.loads(orjson.dumps({
        name: pq.read_table(platform / name, filters=[("merchant_id", "=", merchant)]).to_pylist()
        for name in RECORD_TABLES
    }))


def test_schedule_is_a_monthly_deployment_of_the_whole_run_with_this_workspace(tmp_path):
    from core.errors import ScfriskError
    from core.settings import Settings
    from pipelines.run import monthly_deployment

    settings = Settings(home=tmp_path / "ws")
    deployment = monthly_deployment(settings, SAMPLE)
    assert deployment.flow_name == "scfrisk-run"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 1 * *"]
    assert Settings(**deployment.parameters["settings"]) == settings
    assert deployment.parameters["source"] == str(SAMPLE.resolve())
    with pytest.raises(ScfriskError, match="not a valid cron expression"):
        monthly_deployment(settings, SAMPLE, cron="every month")
