"""Great Expectations validation of raw tables, built in code from `pipelines.schemas`.

The `TableSpec` is the one source of truth: every expectation below is derived from it (columns and
types, non-null columns, unique key, allowed values, min/max, ordered timestamp pairs, timestamps not in
the future, foreign keys), so the data model, its documentation and its checks cannot drift apart.

Each table is validated once by its own GX Checkpoint with every expectation, using a `BASIC` result
format (counts plus a few examples; failing rows are never materialised). The context is ephemeral and
holds no global state; only the Data Docs HTML is written, under `settings.path("validation")`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.config import Settings
from pipelines.errors import ScfriskError
from pipelines.schemas import TableSpec

log = logging.getLogger(__name__)

SITE = "scfrisk"
ReferenceKeys = Mapping[tuple[str, str], pa.Array]
"""Allowed values of each referenced (table, column): the batch's keys plus the store's."""


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


def build_suite(
    spec: TableSpec, *, now: datetime, allow_future_seconds: int, reference_keys: ReferenceKeys
) -> Any:
    """The expectation suite of one table, derived from its spec alone (plus 'now' and the FK domains)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    latest = pd.Timestamp(now + timedelta(seconds=allow_future_seconds))
    expectations: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[c.name for c in spec.columns], exact_match=True)
    ]
    for col in spec.columns:
        expectations.append(gxe.ExpectColumnValuesToBeOfType(column=col.name, type_=pandas_type(col.type)))
        if not col.nullable:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=col.name))
        if col.allowed is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column=col.name, value_set=list(col.allowed)))
        if col.min_value is not None or col.max_value is not None:
            expectations.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=col.name, min_value=col.min_value, max_value=col.max_value
                )
            )
        if pa.types.is_timestamp(col.type) and not col.scheduled:
            expectations.append(gxe.ExpectColumnValuesToBeBetween(column=col.name, max_value=latest))
    expectations.append(gxe.ExpectColumnValuesToBeUnique(column=spec.key))
    for earlier, later in spec.ordered:
        expectations.append(
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=later, column_B=earlier, or_equal=True, ignore_row_if="either_value_is_missing"
            )
        )
    for fk in spec.foreign_keys:
        domain = reference_keys[(fk.table, fk.ref_column)].to_pylist()
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column=fk.column,
                value_set=domain,
                meta={"foreign_key": f"{fk.table}.{fk.ref_column}"},
            )
        )
    suite = gx.ExpectationSuite(name=spec.name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def to_validation_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas in the dtypes GX checks fastest, without losing integer types to float.

    Integers with nulls use pandas' masked Int dtypes; timestamps are nanoseconds because GX 1.x only
    compares `datetime64[ns]` vectorised (other units go through a Python call per value: 20x slower).
    """
    masked = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
    }
    return table.to_pandas(types_mapper=masked.get, split_blocks=True, coerce_temporal_nanoseconds=True)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
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
    args = ", ".join(f"{k}={v if isinstance(v, (list, str)) else _show(v)}" for k, v in shown.items())
    return f"{config.type}({args})" if args else config.type


def _columns(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    if "column" in kwargs:
        return (kwargs["column"],)
    return (kwargs["column_A"], kwargs["column_B"]) if "column_A" in kwargs else ()


def _detail(config: Any, out: Mapping[str, Any], max_examples: int) -> tuple[str, set[str]]:
    """What went wrong, and which columns it makes unusable for the other checks."""
    if config.type == "expect_table_columns_to_match_set":
        observed, expected = set(out.get("observed_value") or []), set(config.kwargs["column_set"])
        missing, extra = sorted(expected - observed), sorted(observed - expected)
        parts = []
        if missing:
            parts.append(f"missing required column(s) {missing}")
        if extra:
            parts.append(f"unknown column(s) {extra}")
        return "failed: " + "; ".join(parts), set(missing)
    broken = set(_columns(config.kwargs)) if config.type == "expect_column_values_to_be_of_type" else set()
    if "unexpected_count" not in out:
        return f"failed: observed {_show(out.get('observed_value'))}", broken
    detail = f"failed for {out['unexpected_count']} of {out['element_count']} rows"
    shown = dict.fromkeys(_show(v) for v in out.get("partial_unexpected_list", []) if not _is_missing(v))
    examples = list(shown)[:max_examples]
    if examples:
        detail += ", e.g. " + ", ".join(examples)
    return detail, broken


def describe_failures(table: str, result: Any, max_examples: int) -> list[Failure]:
    """Turn a GX suite result into one `Failure` per failed expectation.

    A missing or mistyped column makes its other checks meaningless (they fail or cannot run), so
    only the cause is reported for it: the first failure is the one to fix.
    """
    found: list[tuple[Failure, bool]] = []
    broken: set[str] = set()
    for res in result.results:
        if res.success:
            continue
        config = res.expectation_config
        columns = _columns(config.kwargs)
        if res.exception_info and res.exception_info.get("raised_exception"):
            reason = (str(res.exception_info.get("exception_message")).splitlines() or [""])[0]
            found.append((Failure(table, columns, _rule(config), f"could not be evaluated: {reason}"), False))
            continue
        detail, unusable = _detail(config, res.result, max_examples)
        broken |= unusable
        found.append((Failure(table, columns, _rule(config), detail), bool(unusable)))
    return [f for f, cause in found if cause or not broken.intersection(f.columns)]


def _context(docs_dir: Path) -> Any:
    """An in-memory GX context whose only side effect is one Data Docs site (validation pages only)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    site = {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "site_section_builders": {"expectations": "0", "profiling": "0"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={SITE: site},
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def validate_tables(
    tables: Mapping[str, pa.Table],
    specs: Mapping[str, TableSpec],
    reference_keys: ReferenceKeys,
    settings: Settings,
    now: datetime,
) -> Path:
    """Validate every table, write the Data Docs, and raise `DataValidationError` listing all failures.

    Returns the Data Docs index so a caller can point users at the evidence of a passed batch too.
    """
    import great_expectations as gx

    docs_dir = settings.path("validation")
    context = _context(docs_dir)
    source = context.data_sources.add_pandas("raw_batch")
    result_format = {
        "result_format": "BASIC",
        "partial_unexpected_count": settings.ingest.max_failure_examples,
    }
    failures: list[Failure] = []
    for name, table in tables.items():
        suite = context.suites.add(
            build_suite(
                specs[name],
                now=now,
                allow_future_seconds=settings.ingest.allow_future_seconds,
                reference_keys=reference_keys,
            )
        )
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("batch")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"ingest_{name}",
                validation_definitions=[definition],
                result_format=result_format,
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": to_validation_frame(table)})
        for suite_result in outcome.run_results.values():
            failures += describe_failures(name, suite_result, settings.ingest.max_failure_examples)
        log.info("validated %s: %d rows, %d expectations", name, table.num_rows, len(suite.expectations))
    context.build_data_docs(site_names=[SITE])
    index = docs_dir / "index.html"
    if failures:
        tables_failed = sorted({f.table for f in failures})
        raise DataValidationError(
            f"batch rejected, nothing was loaded: {len(failures)} expectation(s) failed on "
            f"{', '.join(tables_failed)}: "
            + "; ".join(str(f) for f in failures)
            + f" (GX Data Docs: {index})"
        )
    return index
