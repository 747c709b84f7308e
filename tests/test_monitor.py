"""`scfrisk monitor` end to end: a real flow run over a crafted raw store publishes the day's alerts with the
live bundle, the real service over loopback applies the freeze at once and answers GET /v1/merchants/{id}/alerts,
the decision and its audit line say why, replay stays exact, and the watch-list page shows every alert's
evidence and action."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime

import pandas as pd
import pytest

from core.errors import ScfriskError
from core.settings import ServiceConfig, Settings
from pipelines.ingest import ingest_flow
from pipelines.publish import publish
from serving.app import create_app
from serving.audit import read_audit
from serving.auth import Keyring
from serving.bundle import replay
from serving.signing import bundle_key
from testkit.service import POLICY, make_parts, online_snapshot, running_service, train_model
from tests.batch_builder import valid_batch, write_batch

KEY = "monitor-full-key-0123456789"
READ_KEY = "monitor-read-key-0123456789"
AS_OF = datetime(2024, 3, 1)
BORROWER = "M0000001"  # its microloan is 3 days past due at the end of February 2024 (tests/batch_builder.py)


def _live_is(client, bundle_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").json()["bundle_id"] != bundle_id:
        if time.monotonic() > deadline:
            raise AssertionError(f"bundle {bundle_id} did not go live")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def service(tmp_path_factory, prefect_server):
    """A workspace with the crafted batch ingested, a bundle of the testkit model live, and the service."""
    work = tmp_path_factory.mktemp("monitor")
    settings = Settings(home=work / "home", service=ServiceConfig(reload_interval_seconds=0.05))
    ingest_flow(source=str(write_batch(work / "batch", valid_batch())), settings=settings)
    parts = make_parts(work, train_model(seed=7), online_snapshot(300))
    first = publish(parts, settings)
    keyring = Keyring.from_config([f"{READ_KEY}:read"], {"SCFRISK_API_KEYS": KEY})
    with running_service(create_app(settings, keyring), KEY) as client:
        yield {"client": client, "settings": settings, "parts": parts, "first": first}


@pytest.fixture(scope="module")
def monitored(service):
    """One real `monitor` flow run as of 2024-03-01, its bundle live."""
    from pipelines.monitor import monitor_flow

    before = service["client"].get(f"/v1/merchants/{BORROWER}/limits").json()
    result = monitor_flow(settings=service["settings"], as_of=AS_OF)
    _live_is(service["client"], result.bundle_id)
    return {"result": result, "before": before}


def _microloan(body: dict) -> dict:
    return next(row for row in body["limits"] if row["product"] == "microloan")


def test_the_flow_finds_the_late_loan_and_publishes_its_alerts(service, monitored):
    result = monitored["result"]
    assert result.loans == 1 and result.bundle_id != service["first"]
    alerts = result.alerts
    assert alerts["signal"].tolist() == ["days_past_due"] and alerts["action"].tolist() == ["freeze"]
    assert alerts["loan_id"].tolist() == [1] and alerts["merchant_id"].tolist() == [BORROWER]
    assert "3 days past due at the month end of 2024-02-29" in alerts["reason"].iloc[0]
    assert pd.read_parquet(result.table).equals(alerts)
    assert "1 live loans, 1 alerts on 1 loans (1 freeze)" in result.describe()


def test_a_published_freeze_sets_the_limit_to_zero_and_declines_with_the_reason(service, monitored):
    client = service["client"]
    assert _microloan(monitored["before"])["limit"] > 0 and _microloan(monitored["before"])["monitoring_action"] is None
    row = _microloan(client.get(f"/v1/merchants/{BORROWER}/limits").json())
    assert row["limit"] == 0.0 and row["monitoring_action"] == "freeze"
    assert row["monitoring_reasons"][0]["code"] == "monitoring.freeze"
    other = next(r for r in client.get(f"/v1/merchants/{BORROWER}/limits").json()["limits"]
                 if r["product"] == "order_financing")
    assert other["limit"] > 0 and other["monitoring_action"] is None  # only the loan's product is frozen

    body = client.post("/v1/score", json={"merchant_id": BORROWER, "product": "microloan",
                                          "requested_amount": 100}).json()
    assert body["decision"]["outcome"] == "decline" and body["decision"]["reason_codes"] == ["monitoring.freeze"]
    assert "days past due" in body["decision"]["reasons"][0] and "freeze the undrawn microloan limit" in \
        body["decision"]["reasons"][0]
    assert body["reason_codes"][0]["code"] == "monitoring.freeze" and body["reason_codes"][0]["source"] == "policy"

    settings = service["settings"]
    line = next(r for r in read_audit(settings.audit_log) if r["request_id"] == body["request_id"])
    assert line["decision"] == "decline" and "monitoring.freeze" in line["policy_reasons"]
    again = replay(line, settings.path("published"), key=bundle_key(settings))
    assert again == {"pd": line["pd"], "grade": line["grade"], "decision": "decline"}


def test_a_features_payload_naming_the_frozen_merchant_is_frozen_too(service, monitored):
    client = service["client"]
    snapshot = service["parts"].online_features.set_index("merchant_id")
    features = json.loads(snapshot.loc[[BORROWER]].to_json(orient="records"))[0]
    body = client.post("/v1/score", json={"merchant_id": BORROWER, "features": features, "product": "microloan",
                                          "requested_amount": 100}).json()
    assert body["scoring_mode"] == "features" and body["decision"]["outcome"] == "decline"
    line = next(r for r in read_audit(service["settings"].audit_log) if r["request_id"] == body["request_id"])
    settings = service["settings"]
    assert replay(line, settings.path("published"), key=bundle_key(settings))["decision"] == "decline"


def test_the_alerts_endpoint_contract(service, monitored):
    client = service["client"]
    reader = {"X-API-Key": READ_KEY}
    body = client.get(f"/v1/merchants/{BORROWER}/alerts", headers=reader).json()
    assert body["merchant_id"] == BORROWER and body["as_of"] == "2024-03-01T00:00:00"
    assert body["bundle_id"] == monitored["result"].bundle_id
    [alert] = body["alerts"]
    assert set(alert) == {"loan_id", "product", "signal", "evidence", "action", "cut_share", "reason"}
    assert alert["loan_id"] == 1 and alert["product"] == "microloan" and alert["cut_share"] is None
    assert alert["evidence"]["days_past_due"] == 3 and alert["evidence"]["observed_at"] == "2024-02-29"
    quiet = client.get("/v1/merchants/M0000002/alerts", headers=reader)
    assert quiet.status_code == 200 and quiet.json()["alerts"] == []
    unknown = client.get("/v1/merchants/M9999999/alerts", headers=reader)
    assert unknown.status_code == 404 and "M9999999" in unknown.json()["detail"]
    assert client.get(f"/v1/merchants/{BORROWER}/alerts", headers={"X-API-Key": "nope"}).status_code == 401
    spec = client.get("/openapi.json").json()["paths"]["/v1/merchants/{merchant_id}/alerts"]["get"]
    assert set(spec["responses"]) >= {"200", "401", "404"}


def test_a_cut_and_an_escalation_published_reach_the_service(service, monitored):
    """Alerts of any action, published with a bundle, change what the service offers; a later bundle
    without them lifts them."""
    client, settings = service["client"], service["settings"]
    alerts = pd.DataFrame({
        "as_of": pd.Timestamp(AS_OF), "loan_id": [7, 8], "merchant_id": "M0000002",
        "product": ["order_financing", "microloan"], "signal": ["sales_drop", "pd_migration"],
        "evidence": ['{"sales_ratio": 0.2}', '{"pd_now": 0.09}'], "action": ["cut", "escalate"],
        "cut_share": [0.5, None], "reason": ["net sales fell to 20% of their level", "the PD rose"]})
    before = {r["product"]: r for r in client.get("/v1/merchants/M0000002/limits").json()["limits"]}
    bundle_id = publish(dataclasses.replace(service["parts"], alerts=alerts, alerts_as_of="2024-03-01T00:00:00"),
                        settings)
    _live_is(client, bundle_id)
    after = {r["product"]: r for r in client.get("/v1/merchants/M0000002/limits").json()["limits"]}
    cut = after["order_financing"]
    assert cut["monitoring_action"] == "cut" and cut["limit"] == (before["order_financing"]["limit"] * 0.5) // 100 * 100
    body = client.post("/v1/score", json={"merchant_id": "M0000002", "product": "order_financing",
                                          "requested_amount": before["order_financing"]["limit"]}).json()
    assert body["decision"]["outcome"] == "counter_offer" and body["decision"]["amount"] == cut["limit"]
    assert body["decision"]["reason_codes"] == ["request.above_limit", "monitoring.cut"]
    body = client.post("/v1/score", json={"merchant_id": "M0000002", "product": "microloan",
                                          "requested_amount": 100}).json()
    assert body["decision"]["outcome"] == "refer" and body["decision"]["reason_codes"] == ["monitoring.escalate"]
    assert client.get("/v1/merchants/M0000002/alerts").json()["alerts"][0]["cut_share"] == 0.5

    lifted = publish(dataclasses.replace(service["parts"], alerts=alerts.iloc[:0], alerts_as_of="2024-03-02T00:00:00"),
                     settings)
    _live_is(client, lifted)
    assert client.get("/v1/merchants/M0000002/limits").json()["limits"] == list(before.values())


def test_the_watch_list_page_shows_each_alert_with_its_evidence_and_action(monitored):
    page = monitored["result"].watch_list.read_text()
    assert "Watch list of 2024-03-01" in page and "M0000001" in page
    assert "freeze the undrawn microloan limit" in page
    assert "Days past due at the latest month end: 3 days" in page and "Outstanding balance of the loan: CNY" in page
    assert "3 days past due at the month end of 2024-02-29" in page


def test_monitor_refuses_a_workspace_with_no_live_bundle(tmp_path):
    from pipelines.monitor import run_monitor

    with pytest.raises(ScfriskError, match="no bundle is live .*run `scfrisk run` first"):
        run_monitor(Settings(home=tmp_path / "home"), AS_OF)


def test_monitor_refuses_a_policy_whose_credit_terms_changed(service, tmp_path):
    """The new bundle carries the workspace policy beside the live limits: only [monitoring] may differ."""
    from pipelines.monitor import run_monitor

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.read_text().replace("refer_ratio = 2.0", "refer_ratio = 3.0"))
    settings = service["settings"].model_copy(update={"policy_file": policy})
    with pytest.raises(ScfriskError, match=r"credit terms of the policy file .* differ from the live bundle's"):
        run_monitor(settings, AS_OF)


def test_the_collateral_sums_do_not_depend_on_the_order_the_rows_are_read_in():
    """Money summed as floats gave 5696.130000000001 from a local raw store and 5696.129999999999 from the same
    store on S3 (tests/test_object_storage.py): its files come in another order. Summed as exact decimals."""
    import duckdb

    from pipelines.monitor import RECEIVABLES, WAREHOUSE

    book = pd.DataFrame({"loan_id": ["L1"], "merchant_id": ["M1"], "disbursed_at": [pd.Timestamp("2025-01-10")]})
    values = [0.1, 0.2, 0.3] * 7
    sums = set()
    for order in (values, values[::-1]):
        n = len(order)
        receivables = pd.DataFrame({"merchant_id": ["M1"] * n, "amount": order, "paid_at": [pd.NaT] * n,
                                    "issued_at": [pd.Timestamp("2025-01-01")] * n,
                                    "due_at": [pd.Timestamp("2025-02-01")] * n})
        inventory_receipts = pd.DataFrame({"merchant_id": ["M1"] * n, "appraised_value": order,
                                           "received_at": [pd.Timestamp("2025-01-01")] * n,
                                           "released_at": [pd.NaT] * n})
        con = duckdb.connect(config={"threads": 1})
        for name, frame in (("book", book), ("receivables", receivables), ("inventory_receipts", inventory_receipts)):
            con.register(name, frame)
        as_of = {"as_of": datetime(2025, 3, 1)}
        warehouse = con.execute(WAREHOUSE, as_of).df()
        financed = con.execute(RECEIVABLES, as_of).df()
        sums.add((warehouse["warehouse_value_now"].item(), financed["financed_receivables"].item(),
                  financed["financed_overdue"].item()))
    assert sums == {(4.2, 4.2, 4.2)}
