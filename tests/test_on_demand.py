"""Scoring from raw records: features computed on demand equal the offline store's, records are checked by
the data model's rules, and the service scores, bounds, answers and audits such a request."""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
from datetime import datetime
from pathlib import Path

import duckdb
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from core.raw_store import RawStore
from core.rules import check_records, spec_rules
from core.schemas import TABLES, conform
from core.settings import ServiceConfig, Settings
from features.definitions import feature_names, feature_set_version
from features.offline_store import OfflineStore
from features.on_demand import RECORD_TABLES, InvalidRecords, RecordsError, features_from_records
from pipelines.ingest import reference_keys
from pipelines.publish import publish, switch_to
from serving.app import create_app
from serving.audit import inputs_hash, read_audit
from serving.auth import Keyring
from serving.bundle import replay
from serving.signing import bundle_key
from testkit.service import make_parts, online_snapshot, running_service, train_model
from tests.batch_builder import to_arrow, valid_batch
from tests.conftest import SAMPLE
from tests.test_validation import CORRUPTIONS, NOW

MERCHANTS = ["M0000042", "M0000074", "M0000085", "M0000088"]
"""The issue's merchant, two whose features are together all known and non-zero (receivables, warehouse
goods, loans in arrears), and one onboarded two weeks before the first as_of."""
NOT_SCORED = ["M0000001", "M0000002"]
"""Also in the raw store, so reading one merchant's records has others to leave out."""
KEY = "records-key-0123456789"
LATER = datetime(2026, 1, 1)
"""After the sample's last fact: the 'now' of the records' rules."""


@functools.cache
def _sample_table(name: str) -> pa.Table:
    return pq.read_table(SAMPLE / name)


def _sample(name: str, merchants: list[str]) -> pa.Table:
    table = _sample_table(name)
    return table.filter(pc.is_in(table.column("merchant_id"), value_set=pa.array(merchants)))


def _wire(records: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """As the records travel in a request: JSON (timestamps as ISO 8601 text)."""
    return orjson.loads(orjson.dumps(records))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A raw store holding the sample's records of a few merchants, and its offline feature store."""
    root = tmp_path_factory.mktemp("stores")
    raw = RawStore(root / "raw")
    with raw.transaction() as staging:
        for name in TABLES:
            staging.stage(name, _sample(name, MERCHANTS + NOT_SCORED))
        staging.commit()
    return raw, OfflineStore(root / "features", raw)


def _records_in_store(raw: RawStore, merchant: str) -> dict[str, list[dict]]:
    con = duckdb.connect()
    return _wire({
        name: con.sql(f"SELECT * FROM {raw.register(con, name)} "
                      f"WHERE merchant_id = '{merchant}'").to_arrow_table().to_pylist()
        for name in RECORD_TABLES
    })


def _same(computed: object, stored: object) -> bool:
    """Equal, up to the order DuckDB happens to add floating-point values in."""
    if isinstance(stored, float) and math.isnan(stored):
        return computed is None
    if isinstance(stored, float):
        return isinstance(computed, float) and math.isclose(computed, stored, rel_tol=1e-9, abs_tol=1e-12)
    return computed == stored


@pytest.mark.parametrize("as_of", ["2025-12-01", "2025-11-20 13:45:00"])
def test_features_from_records_equal_the_offline_store(stores, as_of):
    raw, offline = stores
    as_of = pd.Timestamp(as_of)
    snapshot = offline.read(as_of).set_index("merchant_id")
    assert set(snapshot.index) == set(MERCHANTS + NOT_SCORED)
    known = set()
    for merchant in MERCHANTS:
        computed = features_from_records(_records_in_store(raw, merchant), as_of.to_pydatetime(), now=LATER)
        assert computed.merchant_id == merchant and computed.as_of == as_of
        assert list(computed.features) == feature_names()
        differ = {n: (computed.features[n], snapshot.loc[merchant, n]) for n in feature_names()
                  if not _same(computed.features[n], snapshot.loc[merchant, n])}
        assert not differ, f"{merchant} as of {as_of}: on demand vs offline {differ}"
        known |= {n for n, v in computed.features.items() if v not in (None, 0, 0.0)}
    assert known == set(feature_names()), "every feature is known and non-zero for some merchant checked"


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_records_fail_the_rules_of_ingestion_in_its_words(corrupt, tmp_path):
    """The Arrow check of the shared rules says what GX says at ingestion (test_validation), for each rule;
    a type failure also counts the rows whose values do not read as the type."""
    good = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    bad = valid_batch()
    name, expected = corrupt(bad)
    spec = TABLES[name]
    rules = spec_rules(spec, now=NOW, allow_future_seconds=0,
                       reference_keys=reference_keys(good, RawStore(tmp_path / "empty")))
    failures = check_records(conform(to_arrow(name, bad[name]), spec), spec, rules, max_examples=5)
    assert len(failures) == 1
    if "be_of_type" in expected:
        expected = expected.replace("failed: observed 'str'", "failed for 2 of 2 rows, e.g. '1000 EUR', '450 EUR'")
    assert expected in str(failures[0])


def _profile_and_orders() -> dict[str, list[dict]]:
    return _wire({name: _sample(name, ["M0000042"]).to_pylist() for name in ("merchants", "orders")})


def test_records_are_read_as_ingestion_reads_text():
    records = _profile_and_orders()
    orders = records["orders"]
    orders[0]["amount"], orders[1]["amount"] = "12.5", -3.0  # text that reads as a number is a number
    orders[2]["ordered_at"] = "2025-03-01T10:00:00Z"  # the data model's timestamps are naive UTC
    orders[3]["order_id"] = 4.5
    orders[4]["colour"] = "red"
    for order in orders[5:]:
        order.pop("rating")  # an omitted column is empty
    with pytest.raises(InvalidRecords) as err:
        features_from_records(records, LATER, now=LATER)
    assert [str(f) for f in err.value.failures] == [
        "orders: expect_table_columns_to_match_set failed: unknown column(s) ['colour']",
        "orders.order_id: expect_column_values_to_be_of_type(type_=int64) failed for 1 of 160 rows, e.g. '4.5'",
        "orders.ordered_at: expect_column_values_to_be_of_type(type_=datetime64) failed for 1 of 160 rows, "
        "e.g. '2025-03-01T10:00:00Z'",
        "orders.amount: expect_column_values_to_be_between(min_value=0.0) failed for 1 of 160 rows, e.g. -3.0",
    ]
    other = _profile_and_orders()
    other["orders"][7]["merchant_id"] = "M0000043"
    other["orders"][8]["shipped_at"] = "2020-01-01T00:00:00"
    with pytest.raises(InvalidRecords) as err:
        features_from_records(other, LATER, now=datetime(2025, 6, 1))
    failures = [str(f) for f in err.value.failures]
    assert "orders.merchant_id: foreign key to merchants.merchant_id failed for 1 of 160 rows, e.g. 'M0000043'" \
        in failures
    assert any(f.startswith("orders.shipped_at >= orders.ordered_at: expect_column_pair_values_a_to_be_greater_than_b"
                            "(or_equal=True) failed for 1 of 160 rows") for f in failures)
    assert any(f.startswith("orders.ordered_at: expect_column_values_to_be_between(max_value=2025-06-01T00:00:00) "
                            "failed for") for f in failures), "facts after 'now' are refused, as at ingestion"


def test_a_merchant_has_no_features_before_it_was_onboarded():
    with pytest.raises(RecordsError, match="M0000042 was onboarded at .* not before as_of 2020-01-01"):
        features_from_records(_profile_and_orders(), datetime(2020, 1, 1), now=LATER)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A bundle whose model was trained on the feature set this code computes, served on loopback."""
    work = tmp_path_factory.mktemp("records-service")
    settings = Settings(home=work / "home", service=ServiceConfig(max_records=1_000, reload_interval_seconds=0.05))
    parts = make_parts(work, train_model(seed=7), online_snapshot(50))
    assert parts.feature_set_version == feature_set_version()
    publish(parts, settings)
    app = create_app(settings, Keyring.from_config([], {"SCFRISK_API_KEYS": KEY}))
    with running_service(app, KEY) as client:
        yield {"client": client, "settings": settings, "parts": parts}


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _records(merchant: str) -> dict[str, list[dict]]:
    return _wire({name: _sample(name, [merchant]).to_pylist() for name in RECORD_TABLES})


def test_records_are_scored_as_their_features_would_be_and_replayed_from_the_audit(service):
    client, settings = service["client"], service["settings"]
    records = _records("M0000042")
    request = {"records": records, "as_of": "2025-12-01T00:00:00", "product": "microloan", "requested_amount": 5000}
    body = client.post("/v1/score", json=request).json()
    assert body["scoring_mode"] == "records" and body["merchant_id"] == "M0000042"
    assert body["features_as_of"] == "2025-12-01T00:00:00"
    features = features_from_records(records, datetime(2025, 12, 1), now=LATER).features
    explicit = client.post("/v1/score", json={"features": features, "product": "microloan",
                                              "requested_amount": 5000}).json()
    assert explicit["scoring_mode"] == "features"
    assert body["pd"] == explicit["pd"] and body["limits"] == explicit["limits"]
    assert body["decision"] == explicit["decision"] and body["reason_codes"] == explicit["reason_codes"]
    assert client.post("/v1/score", json={"merchant_id": "M0000003"}).json()["scoring_mode"] == "online"

    line = {r["request_id"]: r for r in read_audit(settings.audit_log)}[body["request_id"]]
    assert line["scoring_mode"] == "records" and line["as_of"] == "2025-12-01T00:00:00"
    assert line["records_hash"] == inputs_hash(records) and line["records_rows"]["orders"] == 160
    inputs = client.get("/v1/model").json()["inputs"]
    assert line["features"] == {name: features[name] for name in inputs} and line["merchant_id"] == "M0000042"
    assert "buyer_id" not in orjson.dumps(line).decode(), "the records themselves stay out of the audit log"
    again = replay(line, settings.path("published"), key=bundle_key(settings))
    assert again == {"pd": body["pd"], "grade": body["grade"], "decision": body["decision"]["outcome"]}


def test_the_records_query_runs_on_the_services_duckdb_budget_and_spill_folder(service):
    """Not DuckDB's defaults (80% of the machine's memory per connection, spill files in the working
    directory): the service's `[compute] memory_limit`, spill under its SCFRISK_HOME (`core.sql`)."""
    from core.sql import out_of_memory

    settings = service["settings"]
    spill = settings.home / "tmp"
    shutil.rmtree(spill, ignore_errors=True)
    body = service["client"].post("/v1/score", json={"records": _records("M0000042")}).json()
    assert body["scoring_mode"] == "records"
    assert spill.is_dir()
    assert f"[compute] memory_limit = {settings.compute.memory_limit}" in str(out_of_memory())


def test_without_as_of_the_features_are_as_of_the_request(service):
    before = datetime.utcnow()
    body = service["client"].post("/v1/score", json={"records": _records("M0000088")}).json()
    assert body["scoring_mode"] == "records" and datetime.fromisoformat(body["features_as_of"]) >= before


def test_bad_records_get_422_naming_table_column_rule_and_rows(service):
    client = service["client"]
    records = _records("M0000042")
    for order in records["orders"][:2]:
        order["amount"] = -5.0
    records["behaviour_events"][0]["event_type"] = "holiday"
    answer = client.post("/v1/score", json={"records": records})
    assert answer.status_code == 422
    detail = {tuple(d["loc"]): d["msg"] for d in answer.json()["detail"]}
    assert detail == {
        ("body", "records", "orders", "amount"):
            "orders.amount: expect_column_values_to_be_between(min_value=0.0) failed for 2 of 160 rows, e.g. -5.0",
        ("body", "records", "behaviour_events", "event_type"):
            "behaviour_events.event_type: expect_column_values_to_be_in_set(value_set=['login', 'listing_change', "
            "'price_change', 'complaint', 'cs_response']) failed for 1 of 417 rows, e.g. 'holiday'",
    }


def test_requests_the_service_refuses_with_the_reason(service):
    client = service["client"]
    records = _records("M0000042")
    too_many = {**records, "behaviour_events": records["behaviour_events"] * 3}
    refused = client.post("/v1/score", json={"records": too_many})
    rows = sum(map(len, too_many.values()))
    assert refused.status_code == 413
    assert refused.json()["detail"] == f"records hold {rows} rows, more than max_records 1000"
    cases = {
        "give features or records, not both": {"records": records, "features": {"tenure_days": 1}},
        "as_of goes with records": {"merchant_id": "M0000003", "as_of": "2025-12-01T00:00:00"},
        "is not the records' merchant": {"records": records, "merchant_id": "M0000043"},
        "is in the future": {"records": records, "as_of": "2999-01-01T00:00:00"},
        "not before as_of": {"records": records, "as_of": "2020-01-01T00:00:00"},
    }
    for reason, body in cases.items():
        answer = client.post("/v1/score", json=body)
        assert answer.status_code == 422 and reason in answer.text, (reason, answer.text[:300])
    batch = client.post("/v1/score/batch", json={"requests": [{"records": records}, {"merchant_id": "M0000003"}]})
    item, online = batch.json()["results"]
    assert item["status"] == 422 and "scored one merchant a request" in item["detail"] and online["pd"]
    no_profile = client.post("/v1/score", json={"records": {**records, "merchants": []}})
    assert no_profile.status_code == 422
    assert no_profile.json()["detail"][0]["loc"][:3] == ["body", "records", "merchants"]


def test_a_model_of_another_feature_set_cannot_score_records(service):
    client, settings = service["client"], service["settings"]
    live = client.get("/readyz").json()["bundle_id"]
    assert client.get("/v1/model").json()["accepts_records"] is True
    stale = publish(dataclasses.replace(service["parts"], feature_set_version="older"), settings)
    _wait(lambda: client.get("/readyz").json()["bundle_id"] == stale)
    try:
        assert client.get("/v1/model").json()["accepts_records"] is False  # a client can know before sending
        answer = client.post("/v1/score", json={"records": _records("M0000042")})
        assert answer.status_code == 409 and "trained on feature set older" in answer.json()["detail"]
    finally:
        switch_to(settings.path("published"), live)
        _wait(lambda: client.get("/readyz").json()["bundle_id"] == live)


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["0001-01-01T00:00:00", "9999-12-31T23:59:59", "2025-02-30T00:00:00", "2025-06-01",
                     "2025-11-30T23:59:59.999999", "1e308", "-0", "login", "corporate", "M0000085"]),
)
"""What JSON can carry (no NaN or infinity), with edge cases of the data model's columns."""


@given(edits=st.lists(st.tuples(st.sampled_from(RECORD_TABLES), st.integers(0, 10_000), st.integers(0, 20),
                                st.sampled_from(["other row", "empty", "any"]), JSON_SCALARS),
                      min_size=1, max_size=3))
@hypothesis_settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_edit_of_valid_records_gives_features_or_a_named_refusal(edits):
    """Whatever values change to, the records give a feature row or a refusal naming the problem, never
    another error (which the service would answer with a 500)."""
    records = _records_for_edits()
    for name, row, column, kind, value in edits:
        rows = records[name]
        if rows:
            column = TABLES[name].columns[column % len(TABLES[name].columns)].name
            other = rows[(row // 7) % len(rows)].get(column)
            rows[row % len(rows)][column] = {"other row": other, "empty": None, "any": value}[kind]
    try:
        computed = features_from_records(records, datetime(2025, 12, 1), now=LATER)
    except (InvalidRecords, RecordsError) as exc:
        assert str(exc)
    else:
        assert list(computed.features) == feature_names()


def _records_for_edits() -> dict[str, list[dict]]:
    """A fresh copy of a merchant's records (corporate, with receivables, warehouse goods and loans)."""
    return orjson.loads(_records_json("M0000085"))


@functools.cache
def _records_json(merchant: str) -> bytes:
    return orjson.dumps(_records(merchant))


def test_the_readme_example_is_scored_from_its_records(service):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("-d @- <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    body = service["client"].post("/v1/score", content=example, headers={"Content-Type": "application/json"})
    assert body.status_code == 200, body.text
    assert body.json()["scoring_mode"] == "records" and body.json()["merchant_id"] == "M0009001"
