"""Every rule of the data model rejects a crafted bad input with a message a data provider can act on."""

from __future__ import annotations

import gc
import re
import weakref
from datetime import datetime

import pandas as pd
import pyarrow as pa
import pytest

from core.raw_store import RawStore
from core.rules import DataValidationError, pandas_type
from core.schemas import TABLES, conform
from core.validation import BatchValidation, build_rules, check_frames, to_validation_frame
from pipelines.ingest import reference_keys
from testkit.validation import validate_tables
from tests.batch_builder import to_arrow, valid_batch

NOW = datetime(2024, 3, 1)


def _wrong_type(b):  # amounts delivered as text
    b["receivables"]["amount"] = ["1000 EUR", "450 EUR"]
    return (
        "receivables",
        "receivables.amount: expect_column_values_to_be_of_type(type_=float64) failed: observed 'str'",
    )


def _missing_column(b):
    b["merchants"] = b["merchants"].drop(columns="region")
    return (
        "merchants",
        "merchants: expect_table_columns_to_match_set failed: missing required column(s) ['region']",
    )


def _null_key(b):
    b["merchants"].loc[1, "merchant_id"] = None
    return "merchants", "merchants.merchant_id: expect_column_values_to_not_be_null failed for 1 of 3 rows"


def _duplicate_key(b):
    b["merchants"].loc[2, "merchant_id"] = "M0000001"
    return (
        "merchants",
        "merchants.merchant_id: expect_column_values_to_be_unique failed for 2 of 3 rows, e.g. 'M0000001'",
    )


def _bad_status(b):
    b["orders"].loc[4, "status"] = "lost"
    return "orders", "orders.status: expect_column_values_to_be_in_set(value_set=['paid',"


def _negative_amount(b):
    b["receivables"].loc[0, "amount"] = -12.5
    return (
        "receivables",
        "receivables.amount: expect_column_values_to_be_between(min_value=0.0) failed for 1 of 2 rows, e.g. -12.5",
    )


def _unordered(b):
    b["receivables"].loc[0, "paid_at"] = pd.Timestamp("2024-01-01")
    return "receivables", (
        "receivables.paid_at >= receivables.issued_at: expect_column_pair_values_a_to_be_greater_than_b"
        "(or_equal=True) failed for 1 of 2 rows, e.g. (2024-01-01T00:00:00, 2024-01-10T00:00:00)"
    )


def _change_after_updated_at(b):  # paid, but `updated_at` not moved: a pull by watermark would miss it
    b["receivables"]["updated_at"] = [pd.Timestamp("2024-01-10"), None]
    return "receivables", (
        "receivables.updated_at >= receivables.paid_at: expect_column_pair_values_a_to_be_greater_than_b"
        "(or_equal=True) failed for 1 of 2 rows, e.g. (2024-01-10T00:00:00, 2024-02-08T00:00:00)"
    )


def _future(b):
    b["behaviour_events"].loc[2, "event_at"] = pd.Timestamp("2024-06-01")
    return "behaviour_events", (
        "behaviour_events.event_at: expect_column_values_to_be_between(max_value=2024-03-01T00:00:00) "
        "failed for 1 of 3 rows, e.g. 2024-06-01T00:00:00"
    )


def _orphan(b):
    b["loan_applications"].loc[1, "merchant_id"] = "M0009999"
    return "loan_applications", (
        "loan_applications.merchant_id: foreign key to merchants.merchant_id failed for 1 of 2 rows, e.g. 'M0009999'"
    )


CORRUPTIONS = [
    _wrong_type,
    _missing_column,
    _null_key,
    _duplicate_key,
    _bad_status,
    _negative_amount,
    _unordered,
    _change_after_updated_at,
    _future,
    _orphan,
]
"""One defect per rule of the data model, with the message that names it (also checked in Arrow, for
records sent to the scoring service: tests/test_on_demand.py)."""


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_each_rule_rejects_bad_input_with_an_actionable_message(corrupt, settings, tmp_path):
    good = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    bad = valid_batch()
    name, expected = corrupt(bad)
    table = conform(to_arrow(name, bad[name]), TABLES[name])
    # Foreign-key domains come from the valid batch, as if the rest were already in the store.
    domains = reference_keys(good, RawStore(tmp_path / "empty"))
    with pytest.raises(DataValidationError) as err:
        validate_tables({name: table}, TABLES, domains, settings, NOW)
    message = str(err.value)
    assert expected in message
    assert "1 expectation(s) failed" in message  # one defect, one failure: no noise from knock-on checks
    assert str(settings.path("validation") / "index.html") in message
    assert (settings.path("validation") / "index.html").is_file()


def test_a_batch_from_before_updated_at_still_passes(settings, tmp_path):
    """`updated_at` is optional: a batch without it reads as never changed (empty) and passes the rules."""
    good = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    changing = [name for name, spec in TABLES.items() if spec.change_column == "updated_at"]
    assert changing == ["orders", "inventory_receipts", "receivables"]
    assert all("updated_at" not in valid_batch()[name] for name in changing)
    assert all(good[name]["updated_at"].null_count == good[name].num_rows for name in changing)
    assert TABLES["loans"].change_column == "disbursed_at"
    validate_tables(good, TABLES, reference_keys(good, RawStore(tmp_path / "empty")), settings, NOW)


def test_examples_are_capped_and_every_failure_is_listed(settings, tmp_path):
    bad = valid_batch()
    orders = bad["orders"]
    orders["amount"] = -orders["amount"]
    orders["status"] = "lost"
    good = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    with pytest.raises(DataValidationError) as err:
        validate_tables(
            {"orders": to_arrow("orders", orders)},
            TABLES,
            reference_keys(good, RawStore(tmp_path / "empty")),
            settings.model_copy(
                update={"ingest": settings.ingest.model_copy(update={"max_failure_examples": 2})}
            ),
            NOW,
        )
    message = str(err.value)
    assert "2 expectation(s) failed on orders" in message
    assert re.search(r"orders\.amount: \S+ failed for 6 of 6 rows, e\.g\. -120\.0, -35\.5(;| \()", message)
    assert re.search(r"orders\.status: .* failed for 6 of 6 rows, e\.g\. 'lost'(;| \()", message)


def test_suite_is_derived_from_the_spec():
    spec = TABLES["orders"]
    domains = {("merchants", "merchant_id"): pa.array(["M1"])}
    rules = build_rules(spec, now=NOW, allow_future_seconds=0, reference_keys=domains)
    kinds = [rule.explain().expectation_type for rule in rules]
    assert kinds.count("expect_column_values_to_be_of_type") == len(spec.columns)
    assert kinds.count("expect_column_values_to_not_be_null") == sum(not c.nullable for c in spec.columns)
    assert kinds.count("expect_column_pair_values_a_to_be_greater_than_b") == len(spec.ordered)
    assert kinds.count("expect_column_values_to_be_unique") == 1


def test_pandas_types_of_the_schema():
    assert [
        pandas_type(t) for t in (pa.int8(), pa.int64(), pa.float64(), pa.string(), pa.timestamp("us"))
    ] == [
        "int8",
        "int64",
        "float64",
        "str",
        "datetime64",
    ]


def test_a_validated_frame_is_not_kept_alive(settings, tmp_path):
    """GX 1.x caches the frame of every batch for the life of the context; `BatchValidation` clears that
    cache through GX internals. If a GX upgrade moves it, ingest memory grows by a table per table again
    (~2 GB at 10M orders): this fails first."""
    batch = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    domains = reference_keys(batch, RawStore(tmp_path / "empty"))
    validation = BatchValidation(settings, NOW, lambda *_: settings.path("validation") / "index.html")
    frame = to_validation_frame(batch["orders"], "orders")
    alive = weakref.ref(frame)
    assert (
        validation.validate(
            TABLES["orders"], frame, check_frames(TABLES["orders"], batch["orders"], domains), domains
        )
        == []
    )
    del frame
    gc.collect()
    assert alive() is None


def test_timestamp_order_ignores_missing_values_and_counts_only_disordered_rows(settings, tmp_path):
    bad = valid_batch()
    receivables = bad["receivables"]
    receivables["paid_at"] = [None, pd.Timestamp("2024-01-01")]  # one unpaid, one paid before issue
    good = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    with pytest.raises(
        DataValidationError, match=r"receivables\.paid_at >= receivables\.issued_at: .* failed for 1 of"
    ):
        validate_tables(
            {"receivables": to_arrow("receivables", receivables)},
            TABLES,
            reference_keys(good, RawStore(tmp_path / "empty")),
            settings,
            NOW,
        )


def test_a_timestamp_pandas_cannot_hold_is_named_not_crashed_on(settings, tmp_path):
    loans = to_arrow("loans", valid_batch()["loans"])
    far = pa.array([datetime(3000, 1, 1)] * loans.num_rows, pa.timestamp("us"))
    loans = loans.set_column(loans.schema.get_field_index("maturity_at"), "maturity_at", far)
    with pytest.raises(DataValidationError) as err:
        batch = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
        validate_tables(
            {"loans": loans}, TABLES, reference_keys(batch, RawStore(tmp_path / "empty")), settings, NOW
        )
    assert "nothing was loaded: loans.maturity_at: expect_column_values_to_be_between(" in str(err.value)
    assert f"failed for {loans.num_rows} of {loans.num_rows} rows, e.g. 3000-01-01T00:00:00" in str(err.value)


def test_a_passed_batch_gets_data_docs_only_when_asked(settings, tmp_path):
    batch = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    domains = reference_keys(batch, RawStore(tmp_path / "empty"))
    assert validate_tables(batch, TABLES, domains, settings, NOW) is None
    assert not (settings.path("validation") / "index.html").exists()
    asked = settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"data_docs_on_success": True})}
    )
    index = validate_tables(batch, TABLES, domains, asked, NOW)
    assert index == settings.path("validation") / "index.html" and index.is_file()
    assert "orders" in index.read_text()
