"""The scoring service over a real uvicorn server on loopback, with real bundles published beside it."""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
from typer.testing import CliRunner

import serving.live
from core.errors import ScfriskError
from core.settings import ServiceConfig, Settings
from credit.policy import load_policy
from pipelines.cli import app
from pipelines.publish import BundleCheckError, publish, rollback, switch_to
from serving.app import create_app
from serving.audit import read_audit
from serving.auth import Keyring
from serving.bundle import BUNDLES_DIR, LIMITS_FILE, POINTER, BundleError, replay
from serving.live import LiveBundle
from serving.signing import bundle_key
from testkit.service import (
    POLICY,
    drop_last_merchants_limit,
    make_parts,
    online_snapshot,
    running_service,
    tamper_limits,
    train_model,
)

KEY = "full-access-key-0123456789"
READ_KEY = "read-only-key-0123456789"
MERCHANT = "M0000003"


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Bundle 1 published, then the service started on a free loopback port."""
    work = tmp_path_factory.mktemp("service")
    settings = Settings(home=work / "home", service=ServiceConfig(max_batch_size=5, max_request_bytes=20_000,
                                                                 reload_interval_seconds=0.05))
    model, snapshot = train_model(seed=7), online_snapshot(300)
    first = publish(make_parts(work, model, snapshot), settings)
    keyring = Keyring.from_config([f"{READ_KEY}:read"], {"SCFRISK_API_KEYS": KEY})
    with running_service(create_app(settings, keyring), KEY) as client:
        url = str(client.base_url).rstrip("/")
        yield {"client": client, "settings": settings, "work": work, "model": model, "snapshot": snapshot,
               "first": first, "url": url, "keyring": keyring}


def _live(client: httpx.Client) -> str:
    return client.get("/readyz").json()["bundle_id"]


def test_online_merchant_gets_pd_limits_decision_and_reasons(service):
    body = service["client"].post("/v1/score", json={"merchant_id": MERCHANT, "product": "microloan",
                                                      "requested_amount": 1_000_000}).json()
    assert 0 < body["pd"] < 1 and body["grade"] in "ABCDEFG"
    assert [row["product"] for row in body["limits"]] == ["order_financing", "receivable_financing",
                                                         "warehouse_receipt_financing", "microloan"]
    assert body["decision"]["outcome"] in {"refer", "decline"} and body["decision"]["reasons"]
    assert 1 <= len(body["reason_codes"]) <= 4
    assert body["policy_version"] and body["model_version"] == "1" and body["features_as_of"].startswith("2026")


def test_explicit_payload_scores_like_the_online_store(service):
    client, snapshot = service["client"], service["snapshot"]
    features = snapshot.drop(columns="merchant_id").iloc[3].to_dict()
    online = client.post("/v1/score", json={"merchant_id": MERCHANT}).json()
    explicit = client.post("/v1/score", json={"features": features}).json()
    assert explicit["pd"] == pytest.approx(online["pd"], abs=1e-12)
    assert explicit["limits"] == online["limits"]
    assert explicit["reason_codes"] == online["reason_codes"]  # batch index and on-the-fly explainer agree
    del features["net_sales_90d"]
    problem = client.post("/v1/score", json={"features": features})
    assert problem.status_code == 422
    assert problem.json()["detail"][0]["loc"] == ["body", "features", "net_sales_90d"]


def test_risky_payload_is_told_its_own_values_in_catalogue_words(service):
    features = service["snapshot"].drop(columns="merchant_id").iloc[3].to_dict()
    features.update(refund_rate_90d=0.37, late_delivery_rate_90d=0.41, complaints_90d=9)
    body = service["client"].post("/v1/score", json={"features": features}).json()
    reasons = {r["code"]: r["description"] for r in body["reason_codes"]}
    assert 1 <= len(reasons) <= 4 and "refund_rate_90d" in reasons
    assert reasons["refund_rate_90d"].startswith(
        "Share of orders placed in the last 90 days that were refunded: 37%, higher than")
    assert "41%" in reasons["late_delivery_rate_90d"]


def test_a_declined_merchant_is_told_the_rule_first_then_the_factors_and_the_audit_keeps_both(service):
    client, settings = service["client"], service["settings"]
    features = service["snapshot"].drop(columns="merchant_id").iloc[3].to_dict()
    features.update(net_sales_90d=120.0, tenure_days=1000.0, refund_rate_90d=0.37, late_delivery_rate_90d=0.41)
    floor = load_policy(POLICY).product("order_financing").min_net_sales_90d
    body = client.post("/v1/score", json={"features": features, "product": "order_financing",
                                          "requested_amount": 500}).json()
    assert body["decision"]["outcome"] == "decline"
    rule = f"net sales of the last 90 days below {floor:,.0f}, the minimum for order financing"
    assert body["decision"]["reasons"] == [rule] and body["decision"]["reason_codes"] == ["exclusion.sales"]
    first, *factors = body["reason_codes"]
    assert first == {"code": "exclusion.sales", "description": rule, "source": "policy"}
    assert factors and {r["source"] for r in factors} == {"model"}
    assert all(", higher than the typical" in r["description"] or ", lower than the typical" in r["description"]
               for r in factors)
    order = next(x for x in body["limits"] if x["product"] == "order_financing")
    assert (order["exclusion_reason"], order["exclusion_description"]) == ("sales", rule)
    for x in body["limits"]:  # every exclusion in words, never a bare code; none when eligible
        assert (x["exclusion_description"] is None) == x["eligible"]
        assert x["eligible"] or len(x["exclusion_description"].split()) > 4
    record = {r["request_id"]: r for r in read_audit(settings.audit_log)}[body["request_id"]]
    assert record["policy_reasons"] == {"exclusion.sales": rule}
    assert record["reasons"] == [r["code"] for r in factors]


def test_errors_name_what_is_wrong(service):
    client = service["client"]
    assert client.post("/v1/score", json={"merchant_id": "M9999999"}).status_code == 404
    bad = client.post("/v1/score", json={"merchant_id": MERCHANT, "product": "yacht", "requested_amount": 5})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "product"]
    assert client.post("/v1/score", json={"merchant_id": MERCHANT, "requested_amount": -1}).status_code == 422
    huge = {"merchant_id": MERCHANT, "features": {f"f{i}": "x" * 100 for i in range(300)}}
    assert client.post("/v1/score", json=huge).status_code == 413
    batch = {"requests": [{"merchant_id": MERCHANT}] * 6}
    assert client.post("/v1/score/batch", json=batch).status_code == 413


def test_api_keys_and_scopes(service):
    url = service["url"]
    assert httpx.post(f"{url}/v1/score", json={"merchant_id": MERCHANT}).status_code == 401
    wrong = httpx.post(f"{url}/v1/score", json={"merchant_id": MERCHANT}, headers={"X-API-Key": "x" * 30})
    assert wrong.status_code == 401
    read_only = {"X-API-Key": READ_KEY}
    denied = httpx.post(f"{url}/v1/score", json={"merchant_id": MERCHANT}, headers=read_only)
    assert denied.status_code == 403 and "'score' scope" in denied.json()["detail"]
    assert READ_KEY not in denied.text
    assert httpx.get(f"{url}/v1/merchants/{MERCHANT}/limits", headers=read_only).status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/openapi.json").status_code == 200
    with pytest.raises(ScfriskError, match="no API key configured"):
        create_app(service["settings"], Keyring.from_config([], {}))


def test_batch_lookups_and_report(service):
    client, snapshot = service["client"], service["snapshot"]
    features = snapshot.drop(columns="merchant_id").iloc[5].to_dict()
    batch = client.post("/v1/score/batch", json={"requests": [
        {"merchant_id": MERCHANT}, {"features": features, "product": "order_financing", "requested_amount": 100},
        {"merchant_id": "M0000005"}]}).json()["results"]
    assert batch[1]["pd"] == pytest.approx(batch[2]["pd"], abs=1e-12) and batch[1]["decision"]["outcome"]
    limits = client.get(f"/v1/merchants/{MERCHANT}/limits").json()
    assert limits["limits"] == batch[0]["limits"]
    model = client.get("/v1/model").json()
    assert "refund_rate_90d" in model["inputs"] and model["online_merchants"] == 300
    report = client.get(f"/reports/{model['model_version']}")
    assert report.status_code == 200 and "Risk report" in report.text
    assert client.get("/reports/no-such-version").status_code == 404


def test_audit_log_reproduces_decisions(service):
    client, settings = service["client"], service["settings"]
    features = service["snapshot"].drop(columns="merchant_id").iloc[7].to_dict()
    ids = [client.post("/v1/score", json=body).json()["request_id"] for body in (
        {"merchant_id": MERCHANT, "product": "order_financing", "requested_amount": 2500},
        {"features": features, "product": "microloan", "requested_amount": 40_000})]
    records = {r["request_id"]: r for r in read_audit(settings.audit_log)}
    for request_id in ids:
        record = records[request_id]
        assert KEY not in str(record) and record["caller"].startswith("key-")
        again = replay(record, settings.path("published"), key=bundle_key(settings))
        assert again == {"pd": record["pd"], "grade": record["grade"], "decision": record["decision"]}
    # The auditor's command: the same lines replayed from the workspace's log; an edited outcome is caught.
    runner, env = CliRunner(), {"SCFRISK_HOME": str(settings.home_dir)}
    result = runner.invoke(app, ["replay", *(f"--request-id={i}" for i in ids)], env=env)
    assert result.exit_code == 0 and "replayed 2 decision(s): 2 the same, 0 different" in result.output, result.output
    edited = settings.home_dir / "edited.jsonl"
    lines = [r for r in read_audit(settings.audit_log) if r["request_id"] in ids]
    lines[0]["decision"] = "approve" if lines[0]["decision"] != "approve" else "decline"
    edited.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    result = runner.invoke(app, ["replay", "--audit-log", str(edited)], env=env)
    assert result.exit_code == 1 and "1 different" in result.output and ids[0] in result.output, result.output


def test_publish_during_traffic_fails_no_request_then_rollback_and_broken_bundle(service):
    client, settings, work = service["client"], service["settings"], service["work"]
    before = _live(client)
    stop = threading.Event()

    def hammer() -> list[int]:
        codes = []
        with httpx.Client(base_url=service["url"], headers={"X-API-Key": KEY}) as own:
            while not stop.is_set():
                codes.append(own.post("/v1/score", json={"merchant_id": MERCHANT}).status_code)
        return codes

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        second = publish(make_parts(work, train_model(seed=9, rounds=20), service["snapshot"], version="2"), settings)
        _wait(lambda: _live(client) == second)
        stop.set()
        codes = [c for f in futures for c in f.result()]
    assert codes and set(codes) == {200}
    assert client.post("/v1/score", json={"merchant_id": MERCHANT}).json()["model_version"] == "2"

    assert rollback(settings) == before
    _wait(lambda: _live(client) == before)

    published = settings.path("published")
    (published / BUNDLES_DIR / second / LIMITS_FILE).write_bytes(b"corrupt")
    switch_to(published, second)  # as if someone forced a damaged bundle live
    _wait(lambda: client.get("/readyz").json()["status"] == "degraded")
    ready = client.get("/readyz").json()
    assert ready["bundle_id"] == before and second in ready["detail"] and "hash mismatch" in ready["detail"]
    assert client.post("/v1/score", json={"merchant_id": MERCHANT}).json()["bundle_id"] == before
    switch_to(published, before)
    _wait(lambda: client.get("/readyz").json()["status"] == "ready")  # the next test starts on a ready service


def test_readiness_without_a_key_says_only_ready_or_not(service):
    url = service["url"]
    anonymous = httpx.get(f"{url}/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready", "bundle_id": None, "detail": None}
    keyed = httpx.get(f"{url}/readyz", headers={"X-API-Key": READ_KEY}).json()
    assert keyed["status"] == "ready" and keyed["bundle_id"] == _live(service["client"]), keyed
    assert httpx.get(f"{url}/readyz", headers={"X-API-Key": "x" * 30}).status_code == 401


def test_pointer_outside_the_bundles_folder_is_not_followed(service):
    client, settings, work = service["client"], service["settings"], service["work"]
    published, before = settings.path("published"), _live(client)
    elsewhere = Settings(home=work / "elsewhere")
    outside = publish(make_parts(work, service["model"], service["snapshot"], version="outside"), elsewhere)
    for pointer in (f"../../../elsewhere/published/bundles/{outside}",
                    str(elsewhere.path("published") / BUNDLES_DIR / outside)):
        (published / POINTER).write_text(pointer + "\n")  # as anyone who can write the published folder could
        _wait(lambda: client.get("/readyz").json()["status"] == "degraded")
        ready = client.get("/readyz").json()
        assert ready["bundle_id"] == before and f"no published bundle '{pointer}'" in ready["detail"]
        anonymous = httpx.get(f"{service['url']}/readyz")
        assert anonymous.json() == {"status": "ready", "bundle_id": None, "detail": None}
        assert client.post("/v1/score", json={"merchant_id": MERCHANT}).json()["bundle_id"] == before
        switch_to(published, before)
        _wait(lambda: client.get("/readyz").json()["status"] == "ready")


def test_tampered_bundle_with_recomputed_hashes_never_goes_live(service):
    client, settings, work = service["client"], service["settings"], service["work"]
    published, before = settings.path("published"), _live(client)
    tampered = publish(make_parts(work, service["model"], service["snapshot"], version="tampered"), settings)
    _wait(lambda: _live(client) == tampered)
    switch_to(published, before)
    _wait(lambda: _live(client) == before)
    tamper_limits(published / BUNDLES_DIR / tampered, drop_last_merchants_limit)
    switch_to(published, tampered)
    _wait(lambda: client.get("/readyz").json()["status"] == "degraded")
    detail = client.get("/readyz").json()["detail"]
    last = service["snapshot"]["merchant_id"].iloc[-1]
    assert f"merchant {last}, product" in detail and "cannot be decided (TypeError" in detail
    answer = client.post("/v1/score", json={"merchant_id": last, "product": "microloan", "requested_amount": 500})
    assert answer.status_code == 200 and answer.json()["bundle_id"] == before
    with pytest.raises(BundleCheckError, match="cannot be decided"):
        rollback(settings, to=tampered)
    switch_to(published, before)
    _wait(lambda: client.get("/readyz").json()["status"] == "ready")


def test_audit_lines_follow_rotation_and_no_decision_is_answered_without_its_line(service):
    client, path = service["client"], service["settings"].audit_log
    request = {"merchant_id": MERCHANT, "product": "microloan", "requested_amount": 500}
    rotated = path.with_name(path.name + ".1")
    path.rename(rotated)
    after_mv = client.post("/v1/score", json=request).json()["request_id"]
    assert [r["request_id"] for r in read_audit(path)] == [after_mv] and after_mv not in rotated.read_text()
    path.unlink()
    after_rm = client.post("/v1/score", json=request).json()["request_id"]
    assert [r["request_id"] for r in read_audit(path)] == [after_rm]

    path.unlink()
    path.mkdir()  # the log cannot be written: the decision must not be given
    refused = client.post("/v1/score", json=request)
    assert refused.status_code == 500 and "audit log" in refused.json()["detail"] and "pd" not in refused.json()
    assert client.post("/v1/score/batch", json={"requests": [request]}).status_code == 500
    path.rmdir()
    again = client.post("/v1/score", json=request)
    assert again.status_code == 200 and [r["request_id"] for r in read_audit(path)] == [again.json()["request_id"]]


def test_a_broken_bundle_is_named_and_served_once_repaired(service, tmp_path, caplog):
    settings = Settings(home=tmp_path / "home", service=ServiceConfig(reload_interval_seconds=0.05))
    bundle_id = publish(make_parts(tmp_path, service["model"], service["snapshot"]), settings)
    limits = settings.path("published") / BUNDLES_DIR / bundle_id / LIMITS_FILE
    good = limits.read_bytes()
    limits.write_bytes(b"corrupt")
    app = create_app(settings, service["keyring"])
    with caplog.at_level(logging.ERROR, logger="serving.live"), running_service(app, KEY, until="/healthz") as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and f"hash mismatch ['{LIMITS_FILE}']" in ready.json()["detail"]
        refused = client.post("/v1/score", json={"merchant_id": MERCHANT})
        assert refused.status_code == 503 and f"bundle {bundle_id} cannot be served" in refused.json()["detail"]
        assert "hash mismatch" in refused.json()["detail"] and str(tmp_path) not in refused.text + ready.text
        time.sleep(0.5)  # ten polls of an unchanged broken bundle
        limits.write_bytes(good)
        _wait(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/v1/score", json={"merchant_id": MERCHANT}).json()["bundle_id"] == bundle_id
    errors = [r for r in caplog.records if r.name == "serving.live" and r.levelno >= logging.ERROR]
    assert len([r for r in errors if bundle_id in r.getMessage()]) == 1


def test_a_service_with_a_bundle_key_refuses_unsigned_bundles(service, tmp_path):
    key_file = tmp_path / "secrets" / "bundle.key"
    key_file.parent.mkdir()
    key_file.write_text(secrets.token_hex(32))
    unsigned = Settings(home=tmp_path / "home", service=ServiceConfig(reload_interval_seconds=0.05))
    signed = unsigned.model_copy(update={"bundle_key_file": key_file})
    publish(make_parts(tmp_path, service["model"], service["snapshot"]), unsigned)
    with running_service(create_app(signed, service["keyring"]), KEY, until="/healthz") as client:
        assert "is not signed" in client.get("/readyz").json()["detail"]
        signed_id = publish(make_parts(tmp_path, service["model"], service["snapshot"], version="2"), signed)
        _wait(lambda: _live(client) == signed_id)


OPERATIONS = ("/v1/score", "/v1/score/batch", "/v1/merchants/{merchant_id}/limits", "/readyz")


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (the test target runs `apt-get install -y chromium`)",
)
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_render_in_chromium_without_network(service, tmp_path, page):
    """Only loopback is reachable (every other name fails to resolve, every proxy is a closed port), so a
    page that loads its scripts from a CDN renders blank; the operations are in the DOM only once the
    page's JavaScript has fetched /openapi.json and rendered it."""
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path}",
         "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--dump-dom", f"{service['url']}{page}"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rendered = proc.stdout
    marker = 'data-path="{}"' if page == "/docs" else "{}"
    assert [op for op in OPERATIONS if marker.format(op) not in rendered] == []
    if page == "/redoc":
        assert "operation-type post" in rendered


@pytest.mark.parametrize("bundle_id", ["..", "../../..", "/etc", "20260101T000000Z/../.."])
def test_replay_refuses_an_audit_line_whose_bundle_leads_out_of_the_bundles(tmp_path, bundle_id):
    (tmp_path / BUNDLES_DIR).mkdir()
    with pytest.raises(BundleError, match="no published bundle"):
        replay({"bundle_id": bundle_id, "request_id": "r1", "merchant_id": "M1"}, tmp_path, key=None)


def test_a_bundle_loads_without_the_cyclic_collector_and_is_frozen_out_of_it_once_live(service, tmp_path):
    """At 10M orders a bundle load makes millions of objects, and each full collection it set off walked them
    and the live bundle's with the GIL held: every request stalled 0.6-0.9 s, four times a load. The load
    runs without the collector, which is back on after it, even when the load fails; the live bundle is frozen
    out of later collections. Freezing leaks nothing only while a bundle holds no reference cycles: a dropped
    bundle is freed by reference counting alone (in a process of its own, where no other thread makes garbage)."""
    settings = Settings(home=tmp_path / "home")
    bundle_id = publish(make_parts(tmp_path, service["model"], service["snapshot"]), settings)
    published = settings.path("published")
    limits = published / BUNDLES_DIR / bundle_id / LIMITS_FILE
    good = limits.read_bytes()
    limits.write_bytes(b"corrupt")
    live = LiveBundle(published, None)
    gc.unfreeze()
    asyncio.run(live.refresh())
    assert live.bundle is None and live.failed and gc.isenabled() and gc.get_freeze_count() == 0
    limits.write_bytes(good)
    asyncio.run(live.refresh())
    assert live.bundle is not None and gc.isenabled() and gc.get_freeze_count() > 0
    gc.unfreeze()

    cycles = subprocess.run(
        [sys.executable, "-c", "import gc, sys; from pathlib import Path; from serving.bundle import check_bundle; "
         "b = check_bundle(Path(sys.argv[1]), None); gc.collect(); del b; print(gc.collect())",
         str(published / BUNDLES_DIR / bundle_id)], capture_output=True, text=True, check=True)
    assert cycles.stdout.strip() == "0", cycles.stdout + cycles.stderr


def test_a_replaced_bundle_is_freed_a_slice_at_a_time_and_never_under_a_request(service, tmp_path, monkeypatch):
    """Dropped at once, a replaced 10M bundle held the GIL 0.36 and 0.42 s while its objects were freed: it is
    freed a slice of merchants at a time, but only once no request holds it (a request in flight keeps its
    whole bundle to the end: its answers are never torn down under it)."""
    monkeypatch.setattr(serving.live, "RELEASE_WAIT_SECONDS", 0.2)
    settings = Settings(home=tmp_path / "home")
    live = LiveBundle(settings.path("published"), None)

    def publish_and_switch(seed: int) -> None:  # another snapshot each time: another bundle
        publish(make_parts(tmp_path, service["model"], online_snapshot(300, seed)), settings)
        asyncio.run(live.refresh())

    publish_and_switch(1)
    in_flight = live.bundle  # a request still answering with the first bundle
    merchants = len(in_flight.online)
    publish_and_switch(2)
    assert live.bundle is not in_flight and len(in_flight.online) == merchants > 0
    second = live.bundle.online  # its answers, not the bundle: nobody holds the second bundle itself
    publish_and_switch(3)
    assert len(second) == 0 and len(live.bundle.online) == merchants
