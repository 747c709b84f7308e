"""The scoring service under hostile input (issue 11: non-finite numbers, wrong types, unknown keys, oversized
batches; issue 14: per-item batch answers), a fuzz test of its OpenAPI contract and a replay of 1,000 audited
decisions. One real bundle, one real uvicorn server on loopback."""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from core.settings import ServiceConfig, Settings
from features.definitions import FEATURES
from pipelines.publish import publish
from serving.app import create_app
from serving.audit import read_audit
from serving.auth import Keyring
from serving.bundle import BUNDLES_DIR, load_bundle, replay
from testkit.service import make_parts, online_snapshot, running_service, train_model

KEY = "hostile-test-key-0123456789"
NON_FINITE = ("Infinity", "-Infinity", "NaN", "1e999")
"""Literals Python's JSON parser turns into non-finite floats (the last one overflows)."""
AMOUNTS = ("net_sales_90d", "unsettled_order_value", "open_receivables_current", "inventory_value_in_warehouse")
"""The features of the issue's attack: they feed the limit engine's exposure bases and sales rule."""


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    settings = Settings(home=work / "home", service=ServiceConfig(reload_interval_seconds=0.05))
    model, snapshot = train_model(seed=7), online_snapshot(300)
    bundle_id = publish(make_parts(work, model, snapshot), settings)
    keyring = Keyring.from_config([], {"SCFRISK_API_KEYS": KEY})
    with running_service(create_app(settings, keyring), KEY) as client:
        yield {"client": client, "settings": settings, "snapshot": snapshot, "model": model,
               "bundle": load_bundle(settings.path("published") / BUNDLES_DIR / bundle_id)}


def _features(svc, row: int = 3) -> dict:
    """A complete, valid payload: the stored inputs of one snapshot merchant."""
    return svc["bundle"].features_of(svc["snapshot"]["merchant_id"].iloc[row])


def _raw(client, path: str, body: dict, literals: dict[str, str] | None = None):
    """POST `body` as JSON text, with the placeholders of `literals` replaced by raw JSON tokens (such as
    `Infinity`, which no strict JSON encoder writes)."""
    text = json.dumps(body)
    for placeholder, literal in (literals or {}).items():
        text = text.replace(json.dumps(placeholder), literal)
    return client.post(path, content=text, headers={"Content-Type": "application/json"})


def _problem(response, status: int = 422) -> list[dict]:
    """The error list of a refusal, parsed as strict JSON (orjson refuses NaN and Infinity)."""
    assert response.status_code == status, response.text[:500]
    return orjson.loads(response.content)["detail"]


def _audit_size(svc) -> int:
    path = svc["settings"].audit_log
    return path.stat().st_size if path.exists() else 0


@pytest.mark.parametrize("literal", NON_FINITE)
def test_non_finite_features_are_refused_naming_the_field(svc, literal):
    """Issue 11.1: `Infinity` in four amounts approved 150,000 of order financing; its audit line said null."""
    body = {"features": {**_features(svc), **{name: f"@{name}" for name in AMOUNTS}},
            "product": "order_financing", "requested_amount": 150_000}
    before = _audit_size(svc)
    detail = _problem(_raw(svc["client"], "/v1/score", body, {f"@{name}": literal for name in AMOUNTS}))
    assert sorted(tuple(e["loc"]) for e in detail) == sorted(("body", "features", name) for name in AMOUNTS)
    assert all("finite" in e["msg"] for e in detail)
    assert _audit_size(svc) == before  # nothing was decided, nothing logged


@pytest.mark.parametrize("literal", NON_FINITE)
def test_non_finite_requested_amount_is_a_clean_422(svc, literal):
    """Issue 11.2: NaN as requested_amount gave 500 (the 422 body could not be serialised)."""
    body = {"merchant_id": "M0000003", "product": "microloan", "requested_amount": "@amount"}
    detail = _problem(_raw(svc["client"], "/v1/score", body, {"@amount": literal}))
    assert detail[0]["loc"] == ["body", "requested_amount"]


def test_text_in_a_numeric_feature_is_422_and_fails_only_its_batch_item(svc):
    """Issue 11.3: text in a numeric feature gave 500 (limit engine: could not convert string to float)."""
    client = svc["client"]
    bad = {**_features(svc), "unsettled_order_value": "abc"}
    detail = _problem(client.post("/v1/score", json={"features": bad}))
    assert detail[0]["loc"] == ["body", "features", "unsettled_order_value"]
    good = _features(svc, 5)
    batch = client.post("/v1/score/batch", json={"requests": [{"features": good}, {"features": bad}]})
    assert batch.status_code == 200
    first, second = batch.json()["results"]
    assert first["pd"] == pytest.approx(svc["bundle"].online[svc["snapshot"]["merchant_id"].iloc[5]].pd, abs=1e-12)
    assert second["status"] == 422 and second["loc"] == ["body", "requests", 1, "features", "unsettled_order_value"]


@pytest.mark.parametrize(("feature", "value"), [
    ("net_sales_90d", True), ("net_sales_90d", "20000"), ("complaints_90d", [1]), ("complaints_90d", {"a": 1}),
    ("category", 3), ("category", False), ("segment", "x" * 65),
])
def test_feature_values_are_typed_from_the_catalogue(svc, feature, value):
    """Issue 11.4: 80 `true`s or 62 features of "abc" were scored with 200 and a grade."""
    detail = _problem(svc["client"].post("/v1/score", json={"features": {**_features(svc), feature: value}}))
    assert detail[0]["loc"] == ["body", "features", feature]


def test_every_numeric_feature_as_text_or_true_is_refused_naming_each(svc):
    client, features = svc["client"], _features(svc)
    numeric = [name for name in features if name not in ("segment", "category")]
    for junk in ("abc", True):
        detail = _problem(client.post("/v1/score", json={"features": {**features, **dict.fromkeys(numeric, junk)}}))
        assert {e["loc"][-1] for e in detail} == set(numeric)


@pytest.mark.parametrize("amount", ["20000", True, [20000], 0, -5])
def test_requested_amount_is_a_strict_positive_number(svc, amount):
    body = {"merchant_id": "M0000003", "product": "microloan", "requested_amount": amount}
    assert _problem(svc["client"].post("/v1/score", json=body))[0]["loc"] == ["body", "requested_amount"]


def test_a_pd_built_on_nothing_is_refused(svc):
    """Issue 11.4: 80 nulls were scored. At most `max_missing_share` of the model's inputs may be unknown."""
    client, bundle = svc["client"], svc["bundle"]
    model_inputs = bundle.model.feature_names
    allowed = math.floor(svc["settings"].service.max_missing_share * len(model_inputs))
    assert 0 < allowed < len(model_inputs)
    nothing = dict.fromkeys(bundle.input_columns)
    detail = _problem(client.post("/v1/score", json={"features": nothing}))
    assert detail[0]["loc"] == ["body", "features"]
    assert f"{len(model_inputs)} of the model's {len(model_inputs)} inputs are unknown" in detail[0]["msg"]
    assert f"at most {allowed}" in detail[0]["msg"]
    features = _features(svc)
    numeric = [f.name for f in bundle.model.features if f.kind == "numeric"]
    at_limit = {**features, **dict.fromkeys(numeric[:allowed])}
    assert client.post("/v1/score", json={"features": at_limit}).status_code == 200
    # a sentinel and an unknown category level are unknown to the model too
    over = {**at_limit, numeric[allowed]: -999, "category": "no-such-category"}
    detail = _problem(client.post("/v1/score", json={"features": over}))
    assert f"{allowed + 2} of the model's" in detail[0]["msg"] and "category" in detail[0]["msg"]


def test_an_absent_input_is_refused_naming_it(svc):
    features = _features(svc)
    del features["tenure_days"]
    detail = _problem(svc["client"].post("/v1/score", json={"features": features}))
    assert detail[0]["loc"] == ["body", "features", "tenure_days"] and "null when unknown" in detail[0]["msg"]


def test_unknown_feature_keys_are_refused_and_never_logged(svc):
    """Issue 11.5: 950 KB junk keys grew the audit log by 18 MB/s."""
    client, before = svc["client"], _audit_size(svc)
    junk = "j" * 950_000
    response = client.post("/v1/score", json={"features": {**_features(svc), junk: 1}})
    detail = _problem(response)
    assert detail[0]["loc"][:2] == ["body", "features"] and detail[0]["loc"][2].startswith("jjjj")
    assert "unknown feature" in detail[0]["msg"]
    assert len(response.content) < 2_000  # the refusal does not echo the junk either
    small = client.post("/v1/score", json={"features": {**_features(svc), "net_sales_91d": 1.0}})
    assert _problem(small)[0]["loc"] == ["body", "features", "net_sales_91d"]
    many = client.post("/v1/score", json={"features": {f"k{i}": 1 for i in range(20_000)}})
    detail = _problem(many)
    assert len(many.content) < 5_000 and detail[-1]["msg"] == "19980 more problems not listed"
    batch = client.post("/v1/score/batch", json={"requests": [{"features": {f"k{i}": 1 for i in range(20_000)}}]})
    assert batch.status_code == 200 and len(batch.content) < 5_000
    assert _audit_size(svc) == before


def test_an_audit_line_holds_what_was_scored_and_is_bounded(svc):
    """The largest payload the schema allows makes a small line: catalogue keys only, short text values."""
    client, bundle = svc["client"], svc["bundle"]
    features = {f.name: ('"\\' * 32 if f.kind == "categorical" else -1.2345678901234567e+300) for f in FEATURES}
    body = {"features": features, "merchant_id": "M" * 64, "product": "order_financing", "requested_amount": 1e12}
    answer = client.post("/v1/score", json=body)
    assert answer.status_code == 200, answer.text[:300]
    line = svc["settings"].audit_log.read_bytes().splitlines()[-1]
    record = orjson.loads(line)
    assert record["request_id"] == answer.json()["request_id"]
    assert list(record["features"]) == bundle.input_columns  # what was scored, not what was sent
    assert len(line) < 4_096


def test_an_oversized_batch_is_refused_before_its_items_are_read(svc):
    """Issue 11.6: 47,000 tiny items under 1 MB were refused only after every item was validated."""
    text = "[" + ",".join(["0"] * 47_000) + "]"  # items that could never validate
    response = svc["client"].post("/v1/score/batch", content='{"requests": ' + text + "}",
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "47000" in response.json()["detail"] and "max_batch_size 500" in response.json()["detail"]


def test_batch_answers_every_item_in_order(svc):
    """Issue 14.4: one unknown merchant turned the whole batch into a 404."""
    client, snapshot = svc["client"], svc["snapshot"]
    ids = snapshot["merchant_id"]
    items = [
        {"merchant_id": ids.iloc[0], "product": "microloan", "requested_amount": 500},
        {"merchant_id": "M9999999"},
        {"features": {**_features(svc), "complaints_90d": "many"}},
        {"features": _features(svc, 8)},
        {"merchant_id": ids.iloc[1], "product": "yacht", "requested_amount": 5},
        "not an object",
        {"merchant_id": ids.iloc[2]},
    ]
    response = client.post("/v1/score/batch", json={"requests": items})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(items)
    assert results[0]["merchant_id"] == ids.iloc[0] and results[0]["decision"]["outcome"]
    assert results[1]["status"] == 404 and "M9999999" in results[1]["detail"]
    assert results[1]["loc"] == ["body", "requests", 1, "merchant_id"]
    assert results[2]["status"] == 422 and results[2]["loc"] == ["body", "requests", 2, "features", "complaints_90d"]
    assert results[3]["pd"] == pytest.approx(svc["bundle"].online[ids.iloc[8]].pd, abs=1e-12)
    assert results[4]["status"] == 422 and results[4]["loc"] == ["body", "requests", 4, "product"]
    assert results[5]["status"] == 422 and results[5]["loc"] == ["body", "requests", 5]
    assert results[6]["merchant_id"] == ids.iloc[2]
    answered = {r["request_id"] for r in results if "request_id" in r}
    logged = {r["request_id"] for r in read_audit(svc["settings"].audit_log)}
    assert len(answered) == 3 and answered <= logged


def test_openapi_enumerates_products_and_outcomes_and_has_examples(svc):
    """Issue 14: the schema had no examples and no enumerated values."""
    spec = svc["client"].get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    products = list(svc["bundle"].policy.products)

    def enum(schema: dict) -> list | None:
        return schema.get("enum") or next((s["enum"] for s in schema.get("anyOf", []) if "enum" in s), None)

    assert enum(schemas["ScoreRequest"]["properties"]["product"]) == products
    assert enum(schemas["ProductLimit"]["properties"]["product"]) == products
    assert enum(schemas["Decision"]["properties"]["outcome"]) == ["approve", "counter_offer", "refer", "decline"]
    assert enum(schemas["ScoreResponse"]["properties"]["grade"]) == list("ABCDEFG")
    assert "$ref" in schemas["BatchRequest"]["properties"]["requests"]["items"]
    assert schemas["ScoreRequest"]["examples"] and schemas["ScoreResponse"]["examples"]
    assert schemas["BatchRequest"]["examples"] and schemas["BatchItemError"]["examples"]
    features = schemas["Features"]["properties"]
    assert set(features) == {f.name for f in FEATURES}
    assert features["category"]["anyOf"][0]["type"] == "string"
    assert features["net_sales_90d"]["anyOf"][0]["type"] == "number"
    assert "unknown" in spec["paths"]["/v1/score"]["post"]["description"]


def _random_payload(rng: np.random.Generator, svc) -> dict:
    """A stored merchant's inputs, scaled, sometimes with an unseen category, and with as many more unknowns
    as the limit allows."""
    bundle = svc["bundle"]
    features = _features(svc, int(rng.integers(len(svc["snapshot"]))))
    for name in features:
        if isinstance(features[name], float) and rng.random() < 0.7:
            features[name] = float(features[name] * rng.lognormal(0.0, 0.5))
    if rng.random() < 0.1:
        features["category"] = "garden"
    if rng.random() < 0.3:
        features["complaints_90d"] = int(rng.integers(0, 20))  # an int: logged and hashed as the float scored
    allowed = math.floor(svc["settings"].service.max_missing_share * len(bundle.model.features))
    known = [n for n in bundle.model.feature_names if n not in bundle.unknown_inputs(features) and n != "category"]
    more = int(rng.integers(0, max(allowed - len(bundle.unknown_inputs(features)), 0) + 1))
    features.update(dict.fromkeys(rng.choice(known, size=more, replace=False).tolist()))
    return features


def _random_request(rng: np.random.Generator, svc) -> dict:
    body = ({"features": _random_payload(rng, svc)} if rng.random() < 0.6
            else {"merchant_id": str(rng.choice(svc["snapshot"]["merchant_id"]))})
    if rng.random() < 0.85:
        body["product"] = str(rng.choice(list(svc["bundle"].policy.products)))
        body["requested_amount"] = float(np.round(rng.lognormal(9.0, 1.5), 2))
    return body


@pytest.mark.slow
def test_a_thousand_random_decisions_replay_from_their_audit_lines(svc):
    """Every decision can be reproduced from its audit line alone: 100 single calls and 900 in batches."""
    client, rng = svc["client"], np.random.default_rng(2026)
    requests = [_random_request(rng, svc) for _ in range(1_000)]
    answers = [client.post("/v1/score", json=body).json() for body in requests[:100]]
    for start in range(100, 1_000, 300):
        answers += client.post("/v1/score/batch", json={"requests": requests[start:start + 300]}).json()["results"]
    assert len(answers) == 1_000 and all("request_id" in a for a in answers), [a for a in answers if "status" in a][:3]
    ids = [a["request_id"] for a in answers]
    records = {r["request_id"]: r for r in read_audit(svc["settings"].audit_log)}
    published = svc["settings"].path("published")
    outcomes = set()
    for request_id in ids:
        record = records[request_id]
        again = replay(record, published, key=None, bundle=svc["bundle"])
        assert again == {"pd": record["pd"], "grade": record["grade"], "decision": record["decision"]}, record
        outcomes.add(record["decision"])
    assert {"approve", "decline", None} <= outcomes  # the corpus exercises the policy, not one branch


JSON_LEAF = st.one_of(st.sampled_from(NON_FINITE), st.sampled_from(['"abc"', "true", "null", "[]", "{}", "-1"]),
                      st.just('"' + "x" * 2_000_000 + '"'))
"""Raw JSON tokens a hostile client puts where the schema wants something else: non-finite numbers, wrong
types, and one string larger than the body limit."""


def _replace_a_leaf(body, data) -> str:
    """`body` as JSON text with one leaf (chosen by Hypothesis) replaced by a hostile raw token."""
    leaves: list[list] = []

    def walk(value, path):
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, [*path, key])
        elif isinstance(value, list) and value:
            for i, item in enumerate(value):
                walk(item, [*path, i])
        else:
            leaves.append(path)

    walk(body, [])
    path = data.draw(st.sampled_from(leaves))
    token = data.draw(JSON_LEAF)
    if not path:
        return token
    target = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = "\0placeholder\0"
    return json.dumps(body).replace(json.dumps("\0placeholder\0"), token, 1)


def test_the_http_contract_under_fuzzing(svc):
    """Generated requests to every operation -- valid, schema-violating, and with non-finite numbers, wrong
    types or oversized values spliced in -- never get a 5xx, and every response matches the OpenAPI schema."""
    url = str(svc["client"].base_url)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/score", "/v1/score/batch", "/v1/merchants/{merchant_id}/limits"}
    headers = {"X-API-Key": KEY}
    posts = [op for op in operations if op.method.upper() == "POST"]
    for operation in operations:
        negative = [schemathesis.GenerationMode.NEGATIVE] if operation in posts else []  # GETs take no body
        for mode in (schemathesis.GenerationMode.POSITIVE, *negative):

            @given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis_settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck),
                                 database=None)
            def exercise(case):
                case.call_and_validate(base_url=url, headers=headers, checks=checks)

            exercise()
    for operation in posts:

        @given(case=operation.as_strategy(), data=st.data())
        @hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                             database=None)
        def hostile(case, data):
            text = _replace_a_leaf(case.body, data)
            response = svc["client"].post(case.operation.path, content=text,
                                          headers={"Content-Type": "application/json"})
            assert response.status_code < 500, response.text[:500]
            assert response.status_code in (200, 404, 413, 422), response.text[:500]
            orjson.loads(response.content)  # strict JSON, whatever was sent

        hostile()


def test_the_unknown_inputs_counted_are_what_the_model_sees_as_missing(svc):
    """The count before scoring is `PDModel.prepare`'s own: a NaN or a missing-value word was counted known."""
    bundle = svc["bundle"]
    numeric = [f.name for f in bundle.model.features if f.kind == "numeric"]
    odd = {**_features(svc), numeric[0]: float("nan"), numeric[1]: "n/a", numeric[2]: -9999, "category": " NA "}
    assert bundle.unknown_inputs(odd) == [name for name in bundle.model.feature_names
                                          if name in (*numeric[:3], "category")]
