"""The rules of the data model, derived once from each table's spec (`core.schemas`), worded for the data
provider, and checked in Arrow on the few records a scoring request carries (`check_records`).

Great Expectations checks the same rules on an ingested batch (`core.validation`); both word a failure the
same way (`describe_failures`), so a provider reads one message whichever path refused its rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import ScfriskError
from core.schemas import TableSpec

REJECTED = "batch rejected, nothing was loaded: "

ReferenceKeys = Mapping[tuple[str, str], pa.Array]
"""Allowed values of each referenced (table, column): the batch's keys plus the store's (unique)."""

class DataValidationError(ScfriskError):
    """A batch broke the data model; the message lists every failed expectation."""

@dataclass(frozen=True)

class Failure:
    """One failed expectation, in words a data provider can act on."""

    table: str
    columns: tuple[str, ...]
    """The column checked, or (later, earlier) for an ordered pair; empty for table-level checks."""
    expectation: str
    detail: str
    failing_rows: int | None = None
    """Rows that broke the rule (None for a table-level rule, e.g. the column set)."""
    rows: int | None = None
    examples: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = " >= ".join(f"{self.table}.{c}" for c in self.columns) or self.table
        return f"{where}: {self.expectation} {self.detail}"

def pandas_type(arrow_type: pa.DataType) -> str:
    """The pandas dtype name GX must observe for a schema type (strings are pandas' `str`)."""
    if pa.types.is_timestamp(arrow_type):
        return "datetime64"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "str"
    return str(arrow_type.to_pandas_dtype().__name__)

@dataclass(frozen=True)

class SpecRule:
    """One rule of a table's data model, as the expectation that states it row by row (GX's name and
    arguments; a foreign key's `value_set` is the Arrow array of the referenced keys).

    `spec_rules` derives them once from the spec; GX checks them on an ingested batch (`build_rules`),
    Arrow on the few records of a scoring request (`check_records`: GX costs a second a request). The
    fields are named as in GX's expectation configuration, so both are worded by `describe_failures`.
    """

    type: str
    kwargs: Mapping[str, Any]
    meta: Mapping[str, str] | None = None

def spec_rules(
    spec: TableSpec, *, now: datetime, allow_future_seconds: int, reference_keys: ReferenceKeys
) -> list[SpecRule]:
    """Every rule of one table, derived from its spec alone (plus 'now' and the foreign-key domains)."""
    latest = pd.Timestamp(now + timedelta(seconds=allow_future_seconds))

    def between(column: str, low: Any, high: Any) -> SpecRule:
        return SpecRule("expect_column_values_to_be_between", {"column": column, "min_value": low, "max_value": high})

    rules = [SpecRule("expect_table_columns_to_match_set",
                      {"column_set": [c.name for c in spec.columns], "exact_match": True})]
    for col in spec.columns:
        rules.append(
            SpecRule("expect_column_values_to_be_of_type", {"column": col.name, "type_": pandas_type(col.type)})
        )
        if not col.nullable:
            rules.append(SpecRule("expect_column_values_to_not_be_null", {"column": col.name}))
        if col.allowed is not None:
            rules.append(SpecRule("expect_column_values_to_be_in_set",
                                  {"column": col.name, "value_set": list(col.allowed)}))
        if col.min_value is not None or col.max_value is not None:
            rules.append(between(col.name, col.min_value, col.max_value))
        if pa.types.is_timestamp(col.type) and not col.scheduled:
            rules.append(between(col.name, None, latest))
    rules.append(SpecRule("expect_column_values_to_be_unique", {"column": spec.key}))
    rules += [
        SpecRule("expect_column_pair_values_a_to_be_greater_than_b",
                 {"column_A": later, "column_B": earlier, "or_equal": True,
                  "ignore_row_if": "either_value_is_missing"})
        for earlier, later in spec.ordered
    ]
    return rules + [
        SpecRule("expect_column_values_to_be_in_set",
                 {"column": fk.column, "value_set": reference_keys[(fk.table, fk.ref_column)]},
                 meta={"foreign_key": f"{fk.table}.{fk.ref_column}"})
        for fk in spec.foreign_keys
    ]

def show_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(show_value(v) for v in value) + ")"
    if isinstance(value, (np.datetime64, pd.Timestamp, datetime)):
        return pd.Timestamp(value).isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)

def _is_missing(value: Any) -> bool:
    return not isinstance(value, tuple) and bool(pd.isna(value))

def _rule(config: Any) -> str:
    kwargs = config.kwargs
    if config.meta and "foreign_key" in config.meta:
        return f"foreign key to {config.meta['foreign_key']}"
    shown = {
        k: v
        for k, v in kwargs.items()
        if k in ("type_", "min_value", "max_value", "or_equal") and v is not None
    }
    if config.type == "expect_column_values_to_be_in_set":
        shown["value_set"] = kwargs["value_set"]
    args = ", ".join(f"{k}={v if isinstance(v, (list, str)) else show_value(v)}" for k, v in shown.items())
    return f"{config.type}({args})" if args else config.type

def _columns(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    if "column" in kwargs:
        return (kwargs["column"],)
    return (kwargs["column_A"], kwargs["column_B"]) if "column_A" in kwargs else ()

def _detail(config: Any, out: Mapping[str, Any], max_examples: int) -> tuple[Failure, set[str]]:
    """What went wrong (table and columns left blank), and which columns it makes unusable for the other
    checks."""
    if config.type == "expect_table_columns_to_match_set":
        observed, expected = set(out.get("observed_value") or []), set(config.kwargs["column_set"])
        missing, extra = sorted(expected - observed), sorted(observed - expected)
        parts = []
        if missing:
            parts.append(f"missing required column(s) {missing}")
        if extra:
            parts.append(f"unknown column(s) {extra}")
        return Failure("", (), _rule(config), "failed: " + "; ".join(parts)), set(missing)
    broken = set(_columns(config.kwargs)) if config.type == "expect_column_values_to_be_of_type" else set()
    if "unexpected_count" not in out:
        return Failure("", (), _rule(config), f"failed: observed {show_value(out.get('observed_value'))}"), broken
    count, rows = int(out["unexpected_count"]), int(out["element_count"])
    detail = f"failed for {count} of {rows} rows"
    shown = dict.fromkeys(show_value(v) for v in out.get("partial_unexpected_list", []) if not _is_missing(v))
    examples = tuple(shown)[:max_examples]
    if examples:
        detail += ", e.g. " + ", ".join(examples)
    return Failure("", (), _rule(config), detail, count, rows, examples), broken

def describe_failures(table: str, results: Iterable[Any], max_examples: int) -> list[Failure]:
    """Turn the GX results of a table's expectations into one `Failure` per failed expectation.

    A missing or mistyped column makes its other checks meaningless (they fail or cannot run), so
    only the cause is reported for it: the first failure is the one to fix.
    """
    found: list[tuple[Failure, bool]] = []
    broken: set[str] = set()
    for res in results:
        if res.success:
            continue
        config = res.expectation_config
        columns = _columns(config.kwargs)
        if res.exception_info and res.exception_info.get("raised_exception"):
            reason = (str(res.exception_info.get("exception_message")).splitlines() or [""])[0]
            found.append((Failure(table, columns, _rule(config), f"could not be evaluated: {reason}"), False))
            continue
        failure, unusable = _detail(config, res.result, max_examples)
        broken |= unusable
        found.append((replace(failure, table=table, columns=columns), bool(unusable)))
    return [f for f, cause in found if cause or not broken.intersection(f.columns)]

@dataclass(frozen=True)

class _Checked:
    """One rule's outcome on an Arrow table, shaped like a GX validation result (see `SpecRule`)."""

    expectation_config: SpecRule
    success: bool
    result: Mapping[str, Any]
    exception_info: None = None

def check_records(table: pa.Table, spec: TableSpec, rules: Iterable[SpecRule], max_examples: int) -> list[Failure]:
    """The failures of a small in-memory table against its spec's rules, checked in Arrow and worded
    as ingestion words them. A type failure counts the values that do not read as the type."""
    checked = []
    for rule in rules:
        found = _arrow_unexpected(table, spec, rule)
        if isinstance(found, list):
            found = {"element_count": len(table), "unexpected_count": len(found),
                     "partial_unexpected_list": found[:max_examples]}
        checked.append(_Checked(rule, found is None, found or {}))
    return describe_failures(spec.name, checked, max_examples)

def _arrow_unexpected(table: pa.Table, spec: TableSpec, rule: SpecRule) -> list[Any] | dict[str, Any] | None:
    """None when the rule holds; else the unexpected values (a GX result for a table-level rule)."""
    kwargs = rule.kwargs
    if rule.type == "expect_table_columns_to_match_set":
        observed = table.column_names
        return None if set(observed) == set(kwargs["column_set"]) else {"observed_value": observed}
    columns = _columns(kwargs)
    if any(c not in table.column_names for c in columns):
        return None  # the column-set rule reports it
    if rule.type == "expect_column_values_to_be_of_type":
        values, wanted = table.column(columns[0]), spec.column_index[columns[0]].type
        if values.type == wanted:
            return None
        delivered = [v for v in values.to_pylist() if v is not None]
        return [v for v in delivered if not _reads_as(v, wanted)] or delivered or {"observed_value": str(values.type)}
    if any(table.column(c).type != spec.column_index[c].type for c in columns):
        return None  # the type rule reports it
    values = table.column(columns[0])
    if rule.type == "expect_column_values_to_not_be_null":
        return _where(values, values.is_null()) or None
    if rule.type == "expect_column_values_to_be_in_set":
        allowed = kwargs["value_set"]
        allowed = allowed if isinstance(allowed, (pa.Array, pa.ChunkedArray)) else pa.array(allowed, values.type)
        return _where(values, pc.and_(values.is_valid(), pc.invert(pc.is_in(values, value_set=allowed)))) or None
    if rule.type == "expect_column_values_to_be_between":
        bounds = ((kwargs["min_value"], pc.less), (kwargs["max_value"], pc.greater))
        outside = [compare(values, pa.scalar(bound, values.type)) for bound, compare in bounds if bound is not None]
        return _where(values, functools.reduce(pc.or_, outside)) or None
    if rule.type == "expect_column_values_to_be_unique":
        counts = pc.value_counts(values.drop_null())
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        return _where(values, pc.is_in(values, value_set=repeated)) or None
    if rule.type == "expect_column_pair_values_a_to_be_greater_than_b":
        later, earlier = table.column(kwargs["column_A"]), table.column(kwargs["column_B"])
        before = pc.less(later, earlier)
        return list(zip(_where(later, before), _where(earlier, before))) or None
    raise ValueError(f"no Arrow check for {rule.type}")

def _where(values: pa.ChunkedArray, mask: pa.ChunkedArray) -> list[Any]:
    """The values where `mask` is true (a null in the mask counts as false)."""
    return pc.filter(values, pc.fill_null(mask, False)).to_pylist()

def _reads_as(value: Any, wanted: pa.DataType) -> bool:
    try:
        pa.array([value]).cast(wanted)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    return True
