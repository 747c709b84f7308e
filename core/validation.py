"""Great Expectations validation of raw tables, built in code from `core.schemas`.

The `TableSpec` is the one source of truth: every rule is derived from it by `spec_rules` (columns and
types, non-null columns, unique key, allowed values, min/max, ordered timestamp pairs, timestamps not in
the future, foreign keys), so the data model, its documentation and its checks cannot drift apart. GX
checks them on an ingested batch; the few records a scoring request carries are checked against the same
rules in Arrow (`core.rules.check_records`), since GX costs about a second per request, and worded the same
way.

Valid data is the common case, so each table is validated in two steps, both by GX. First every rule
with a `BOOLEAN_ONLY` result (no counts, no examples), in its cheapest exact form: a range as the
column's min and max; a foreign key as a distinct count on a small frame of keys (the referenced keys
plus the distinct keys used: their union has no more distinct values than the referenced keys exactly
when every key used exists); an ordered timestamp pair as the minimum of its gap (see `check_frames`).
Only if something fails, the failed rules are run again row by row with a `BASIC` result (counts plus
a few examples; failing rows are never materialised) to say which rows broke them; a pair's row-level
rule runs on a frame of just the table's ordered timestamps, because GX copies the frame it gets for
each pair to drop rows with a missing value. The context is ephemeral and holds no global state (each
run's frame is dropped from GX's caches after it). The one file written is our own validation page,
`settings.path("validation")/index.html`: GX's Data Docs load their CSS and scripts from CDNs and show a
blank page offline, so the page is rendered from the same failures as the error message, self-contained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.rules import (
    REJECTED,
    DataValidationError,
    Failure,
    ReferenceKeys,
    SpecRule,
    describe_failures,
    show_value,
    spec_rules,
)
from core.schemas import TableSpec
from core.settings import Settings

log = logging.getLogger(__name__)


TABLE, KEYS, GAPS = "table", "keys", "gaps"

@dataclass(frozen=True)

class Rule:
    """One rule of the data model: the expectation GX checks first, and a maker of the row-level one
    that explains a failure (the same expectation when it has no cheaper exact form)."""

    check: Any
    explain: Callable[[], Any]
    check_on: str = TABLE
    """The frame the check runs on: the table, or one of `check_frames` (foreign keys, time gaps)."""
    columns: tuple[str, ...] = ()
    """Explained on a frame of only these columns (the ordered timestamps, for a pair rule)."""

def build_rules(
    spec: TableSpec, *, now: datetime, allow_future_seconds: int, reference_keys: ReferenceKeys
) -> list[Rule]:
    """The spec's rules (`spec_rules`) as GX expectations, each checked in its cheapest exact form."""
    import great_expectations.expectations as gxe

    timestamps = tuple(dict.fromkeys(c for pair in spec.ordered for c in pair))

    def to_gx(rule: SpecRule) -> list[Rule]:
        kind = getattr(gxe, "".join(word.capitalize() for word in rule.type.split("_")))
        kwargs = {**rule.kwargs, **({"meta": dict(rule.meta)} if rule.meta else {})}
        if rule.meta and "foreign_key" in rule.meta:
            domain = kwargs["value_set"]
            check = gxe.ExpectColumnUniqueValueCountToBeBetween(
                column=kwargs["column"], min_value=len(domain), max_value=len(domain), meta=kwargs["meta"]
            )
            return [Rule(check, lambda: kind(**{**kwargs, "value_set": domain.to_pylist()}), check_on=KEYS)]

        def explain() -> Any:
            return kind(**kwargs)

        if rule.type == "expect_column_values_to_be_between":
            # Min and max are vectorised for every dtype; row-level between is not (small ints: per value).
            column, low, high = kwargs["column"], kwargs["min_value"], kwargs["max_value"]
            checks = [gxe.ExpectColumnMinToBeBetween(column=column, min_value=low)] if low is not None else []
            if high is not None:
                checks.append(gxe.ExpectColumnMaxToBeBetween(column=column, max_value=high))
            return [Rule(check, explain) for check in checks]
        if rule.type == "expect_column_pair_values_a_to_be_greater_than_b":
            gap = gap_column(kwargs["column_B"], kwargs["column_A"])
            check = gxe.ExpectColumnMinToBeBetween(column=gap, min_value=0)
            return [Rule(check, explain, check_on=GAPS, columns=timestamps)]
        return [Rule(kind(**kwargs), explain)]

    rules = spec_rules(spec, now=now, allow_future_seconds=allow_future_seconds, reference_keys=reference_keys)
    return [gx_rule for rule in rules for gx_rule in to_gx(rule)]

def to_validation_frame(table: pa.Table, name: str) -> pd.DataFrame:
    """Arrow -> pandas in the dtypes GX checks fastest, without losing integer types to float.

    Integers with nulls use pandas' masked Int dtypes; timestamps are nanoseconds because GX 1.x only
    compares `datetime64[ns]` vectorised (other units go through a Python call per value: 20x slower).
    A timestamp nanoseconds cannot hold is a `DataValidationError` naming table `name` and the column.
    """
    masked = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
    }
    try:
        return table.to_pandas(types_mapper=masked.get, split_blocks=True, coerce_temporal_nanoseconds=True)
    except pa.ArrowInvalid as exc:
        failures = list(_outside_nanoseconds(name, table))
        if not failures:
            raise
        raise DataValidationError(REJECTED + "; ".join(str(f) for f in failures)) from exc

def _outside_nanoseconds(name: str, table: pa.Table) -> Iterable[Failure]:
    low, high = pd.Timestamp.min.ceil("us"), pd.Timestamp.max.floor("us")
    for column in table.column_names:
        values = table.column(column)
        if not pa.types.is_timestamp(values.type):
            continue
        outside = pc.or_(
            pc.less(values, pa.scalar(low, values.type)), pc.greater(values, pa.scalar(high, values.type))
        )
        count = pc.sum(outside).as_py() or 0
        if count:
            example = show_value(pc.filter(values, outside)[0].as_py())
            yield Failure(
                name,
                (column,),
                f"expect_column_values_to_be_between(min_value={low.date()}, max_value={high.date()})",
                f"failed for {count} of {len(values)} rows, e.g. {example} (outside what pandas and GX can check)",
            )

def gap_column(earlier: str, later: str) -> str:
    return f"{later} - {earlier}"

def check_frames(spec: TableSpec, table: pa.Table, reference_keys: ReferenceKeys) -> dict[str, pd.DataFrame]:
    """The small frames the cheap checks run on, in place of the table (see the module docstring).

    `keys`: one column per foreign key, the referenced keys then the distinct keys the table uses (a
    few thousand rows, and no key list inside an expectation: GX copies expectation arguments dozens of
    times per run). `gaps`: one column per ordered timestamp pair, the sign of later minus earlier (one
    byte a row), 0 where either is missing: its minimum is >= 0 exactly when every pair is in order,
    which GX checks without copying the pair out of the table for each rule. A column the table lacks
    or mistypes is left out of both: its own rules report it.
    """
    keys: dict[str, pa.Array] = {}
    for fk in spec.foreign_keys:
        domain = reference_keys[(fk.table, fk.ref_column)]
        if fk.column in table.column_names and table.column(fk.column).type == domain.type:
            keys[fk.column] = pa.concat_arrays([domain, pc.unique(table.column(fk.column))])
    rows = max((len(a) for a in keys.values()), default=0)
    padded = {n: pa.concat_arrays([a, pa.nulls(rows - len(a), a.type)]) for n, a in keys.items()}
    gaps: dict[str, pa.ChunkedArray] = {}
    for earlier, later in spec.ordered:
        wanted = spec.column_index[earlier].type
        if all(c in table.column_names and table.column(c).type == wanted for c in (earlier, later)):
            gap = pc.subtract(table.column(later), table.column(earlier)).cast(pa.int64())
            gaps[gap_column(earlier, later)] = pc.fill_null(pc.sign(gap).cast(pa.int8()), 0)
    return {
        KEYS: to_validation_frame(pa.table(padded), spec.name),
        GAPS: to_validation_frame(pa.table(gaps), spec.name),
    }

def _narrow(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """The frame, or only those of `columns` it has (a missing one is reported by its own rules)."""
    return frame[[c for c in columns if c in frame.columns]] if columns else frame

def _suite_name(name: str, columns: tuple[str, ...]) -> str:
    return ".".join((name, *columns))

def _context() -> Any:
    """An in-memory GX context without side effects: no Data Docs site (see the module docstring)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={},
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)

@dataclass(frozen=True)

class TableChecked:
    table: str
    rows: int
    rules: int
    failed: int

PageWriter = Callable[[Sequence[Failure], Sequence[TableChecked], datetime], Path]
"""Writes the validation page of a batch (its failures, the tables checked, when) and returns its path;
the ingest flow passes `reporting.validation_page`'s, so the ground floor renders nothing itself."""

class TableValidator:
    """One GX context that validates tables (or parts of one) one at a time; one per process is enough,
    for any number of parts (its context costs ~2 s of CPU to make, a validation run ~0.13 s plus the rows)."""

    def __init__(self, settings: Settings, now: datetime) -> None:
        self.settings = settings
        self.now = now
        self.context = _context()
        # One asset for every run: each add or delete re-serialises the whole context config.
        source = self.context.data_sources.add_pandas("raw_batch")
        self.batch = source.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("batch")

    def validate(
        self,
        spec: TableSpec,
        frame: pd.DataFrame,
        checks: Mapping[str, pd.DataFrame],
        reference_keys: ReferenceKeys,
    ) -> tuple[list[Failure], TableChecked]:
        """Check every rule of one table (`to_validation_frame`, `check_frames`); explain the failed
        ones row by row. Takes frames so a caller can free the table."""
        rules = build_rules(
            spec,
            now=self.now,
            allow_future_seconds=self.settings.ingest.allow_future_seconds,
            reference_keys=reference_keys,
        )
        groups: dict[str, list[Rule]] = {}
        for rule in rules:
            groups.setdefault(rule.check_on, []).append(rule)
        failed: list[Rule] = []
        for check_on, group in groups.items():
            name = spec.name if check_on == TABLE else f"{spec.name}.{check_on}"
            failed += self._failed(name, group, frame if check_on == TABLE else checks[check_on])
        failed.sort(key=rules.index)
        failures: list[Failure] = []
        if failed:
            explainers = [
                (make(), columns) for make, columns in {r.explain: r.columns for r in failed}.items()
            ]
            results: list[Any] = []
            for columns in dict.fromkeys(c for _, c in explainers):
                group = [explainer for explainer, c in explainers if c == columns]
                name = _suite_name(f"{spec.name}.failures", columns)
                results += self._run(name, group, _narrow(frame, columns), "BASIC").results
            position = {explainer.id: i for i, (explainer, _) in enumerate(explainers)}
            results.sort(key=lambda res: position[res.expectation_config.id])
            failures = describe_failures(spec.name, results, self.settings.ingest.max_failure_examples)
        log.debug("validated %s: %d rows, %d rules, %d failed", spec.name, len(frame), len(rules), len(failed))
        return failures, TableChecked(spec.name, len(frame), len(rules), len(failures))

    def _failed(self, name: str, rules: list[Rule], frame: pd.DataFrame) -> list[Rule]:
        result = self._run(name, [r.check for r in rules], frame, "BOOLEAN_ONLY")
        failed_ids = {r.expectation_config.id for r in result.results if not r.success}
        return [r for r in rules if r.check.id in failed_ids]

    def _run(self, name: str, expectations: list[Any], frame: pd.DataFrame, result_format: str) -> Any:
        """One GX validation run of a suite on a frame: every expectation in one Validator pass."""
        import great_expectations as gx

        # Expectations go in before the suite is stored: adding them to a stored suite re-serialises it.
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=self.batch, suite=suite)
        )
        result_format_ = {
            "result_format": result_format,
            "partial_unexpected_count": self.settings.ingest.max_failure_examples,
        }
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format_)
        # Gone again, so the context serves any number of partitions of the same table.
        self.context.validation_definitions.delete(name)
        self.context.suites.delete(name)
        # The engine caches the frame of every batch it ran on, for the life of the context.
        engine = self.batch.data_asset.datasource.get_execution_engine()
        engine.batch_manager.reset_batch_cache()
        engine.batch_manager.batch_data_cache.clear()
        return result


class BatchValidation:
    """The validation of a batch: its tables' outcomes (validated here, or in parts elsewhere and recorded),
    and its validation page, written once."""

    def __init__(self, settings: Settings, now: datetime, write_page: PageWriter) -> None:
        self.settings = settings
        self.now = now
        self.write_page = write_page
        self._validator: TableValidator | None = None
        self.failures: list[Failure] = []
        self.tables: list[TableChecked] = []

    @property
    def rules_checked(self) -> int:
        return sum(t.rules for t in self.tables)

    def validate(
        self,
        spec: TableSpec,
        frame: pd.DataFrame,
        checks: Mapping[str, pd.DataFrame],
        reference_keys: ReferenceKeys,
    ) -> list[Failure]:
        """Validate one whole table here (`TableValidator.validate`); return (and keep) its failures."""
        if self._validator is None:
            self._validator = TableValidator(self.settings, self.now)
        failures, checked = self._validator.validate(spec, frame, checks, reference_keys)
        self.record(checked, failures)
        return failures

    def record(self, checked: TableChecked, failures: Sequence[Failure]) -> None:
        """Take the outcome of a table validated elsewhere (in parts: see `merge_failures`)."""
        log.info("validated %s: %d rows, %d rules, %d failed", checked.table, checked.rows, checked.rules,
                 checked.failed)
        self.tables.append(checked)
        self.failures += failures

    def finish(self) -> Path | None:
        """Raise `DataValidationError` listing every failure of the batch, with the validation page it wrote.

        A passed batch gets its page only with `ingest.data_docs_on_success`; returns its path then.
        """
        if not self.failures and not self.settings.ingest.data_docs_on_success:
            return None
        index = self.write_page(self.failures, self.tables, self.now)
        if self.failures:
            tables_failed = sorted({f.table for f in self.failures})
            raise DataValidationError(
                f"{REJECTED}{len(self.failures)} expectation(s) failed on "
                f"{', '.join(tables_failed)}: "
                + "; ".join(str(f) for f in self.failures)
                + f" (validation page: {index})"
            )
        return index


def merge_failures(parts: Sequence[Sequence[Failure]], rows: int, max_examples: int) -> list[Failure]:
    """The failures of a table validated in parts, as if validated whole: one per rule, its failing rows
    summed over the parts, out of the table's `rows`, with the first examples (a table-level failure, the
    same in every part, once)."""
    merged: dict[tuple[tuple[str, ...], str], Failure] = {}
    for failures in parts:
        for failure in failures:
            key = (failure.columns, failure.expectation)
            seen = merged.get(key)
            if failure.failing_rows is None or (seen is not None and seen.failing_rows is None):
                merged.setdefault(key, failure)
                continue
            count = failure.failing_rows + ((seen.failing_rows or 0) if seen is not None else 0)
            examples = tuple(dict.fromkeys([*(seen.examples if seen else ()), *failure.examples]))[:max_examples]
            merged[key] = replace(failure, failing_rows=count, rows=rows, examples=examples,
                                  detail=failed_rows_detail(count, rows, examples))
    return list(merged.values())


def failed_rows_detail(count: int, rows: int, examples: Sequence[str]) -> str:
    """How a row-level failure is worded (as `core.rules` words GX's results)."""
    return f"failed for {count} of {rows} rows" + (", e.g. " + ", ".join(examples) if examples else "")
