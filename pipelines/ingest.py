"""`scfrisk ingest`: read a batch of platform tables, validate all of it, then load it into the raw store.

A batch folder holds `<table>.parquet`, `<table>/` (Parquet parts) or `<table>.csv` for any subset of
the tables in `core.schemas`. The batch is all or nothing: every table is validated (foreign keys
against the batch plus the store) before a single partition is swapped into the store. `oracle/` is
the simulator's ground truth and is never ingested.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib.util
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from core.partitioning import parse_partition_key
from core.raw_store import KeyMoves, RawStore, StagedPartition
from core.rules import Failure, show_value
from core.schemas import TABLES, ForeignKey
from core.settings import Settings
from core.sources import Piece, Source, open_source, pieces
from core.sql import duckdb_connect, fetch_one, size_bytes
from core.staging import BatchSpill, Located, SplitPart, StagedTable, concat
from core.validation import (
    BatchValidation,
    TableChecked,
    TableValidator,
    check_frames,
    failed_rows_detail,
    merge_failures,
    to_validation_frame,
)
from pipelines.compute import dask_client, run_partitions

if TYPE_CHECKING:
    import duckdb

    from core.rules import ReferenceKeys

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

RULE_MODULES = ("core.schemas", "core.rules", "core.validation")
"""The code that decides whether a batch passes: a change to it makes a loaded batch new again."""


def batch_fingerprint(source: Source) -> str:
    """The source's data fingerprint and the rules that check it: the same data in another folder gives the
    same fingerprint, a changed file or rule another one."""
    digest = hashlib.sha256(source.fingerprint().encode())
    for module in RULE_MODULES:
        # Located, not imported: a batch already loaded is recognised without importing pandas and GX.
        digest.update(Path(importlib.util.find_spec(module).origin).read_bytes())
    return digest.hexdigest()[:16]


REFERENCED = sorted({(fk.table, fk.ref_column) for spec in TABLES.values() for fk in spec.foreign_keys})
"""Every (table, column) some foreign key points at."""


def key_domain(name: str, column: str, delivered: pa.Table | None, store: RawStore) -> pa.Array:
    """The distinct keys a foreign key may use: the store's, plus the batch's when it delivers that table."""
    parts = [store.distinct_values(name, column)]
    if (
        delivered is not None
        and column in delivered.column_names
        and delivered.column(column).type == parts[0].type
    ):
        parts.append(delivered.column(column).combine_chunks())
    return pc.unique(pa.concat_arrays(parts))


def reference_keys(batch: Mapping[str, pa.Table], store: RawStore) -> ReferenceKeys:
    """The domain of every foreign key used by the batch: referenced keys in the batch and in the store."""
    used = {(fk.table, fk.ref_column) for name in batch for fk in TABLES[name].foreign_keys}
    return {(t, c): key_domain(t, c, batch.get(t), store) for t, c in REFERENCED if (t, c) in used}


@dataclass(frozen=True)
class IngestResult:
    """What one ingest loaded and where: enough for a user to find the data and the validation report."""

    source: str
    store: Path
    snapshot_id: str | None
    rows: dict[str, int]
    partitions_written: dict[str, list[str]]
    store_rows: dict[str, int]
    rules_checked: int
    data_docs: Path | None
    """The validation page of the batch, when written (see `ingest.data_docs_on_success`)."""
    already_loaded: bool = False
    """The store's snapshot was made by this very batch: nothing was read, validated or written."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage of the flow: split (read the source into partitions), keys (checks across
    partitions), partitions (validate and stage them, on the engine), commit."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU seconds per stage, all threads (`partitions`: summed over the processes that ran them): the
    stable figure on a shared machine."""
    stale: dict[str, int] = field(default_factory=dict)
    """Delivered rows kept out per table: older than the stored row of the same key (`RawStore.key_moves`)."""

    def describe(self) -> str:
        if self.already_loaded:
            return (
                f"{self.source} is the batch already loaded into raw store {self.store} (same files, same "
                f"rules): nothing to do; snapshot {self.snapshot_id}"
            )
        lines = [f"ingested {sum(self.rows.values()):,} rows from {self.source} into raw store {self.store}"]
        for name, rows in self.rows.items():
            months = self.partitions_written.get(name, [])  # a table delivered empty writes nothing
            written = f"{len(months)} partition(s) rewritten" if months else "unchanged"
            stale = self.stale.get(name, 0)
            kept_out = f"{stale:,} older than the stored rows of their keys kept out (updated_at), " if stale else ""
            lines.append(
                f"  {name}: {rows:,} rows in batch, {kept_out}{written}, {self.store_rows.get(name, 0):,} rows stored"
            )
        report = (
            f"validation report: {self.data_docs}" if self.data_docs else "no validation page for a passed batch"
        )
        lines.append(f"snapshot {self.snapshot_id}; {self.rules_checked} validation rules passed; {report}")
        return "\n".join(lines)


def ingest(source: Source | Path | str, settings: Settings, now: datetime | None = None) -> IngestResult:
    """Validate the batch and upsert it, partition by partition; nothing is swapped in unless all passed.

    Every stage that reads rows runs on the configured engine (`pipelines.compute.run_partitions`), so the
    flow's process holds an index of files and the keys that fail, never a table: the source is cut into the
    store's partitions (month x merchant bucket, `core.staging`) by one task per piece of the source; the
    rules that span partitions are checked on key columns only, by one task per table (`_key_checks`);
    then every partition is validated with Great Expectations and staged, in units of about `UNIT_ROWS`
    rows: memory is a unit's, whatever the batch. `now` bounds timestamps. The batch that made the store's
    current snapshot is not ingested again (a rerun of the pipeline after a later stage failed): it would
    pass and change nothing.
    """
    # Objects alive before the batch never become garbage here: freezing them makes each collection in
    # `_release_memory` scan only the batch's objects (0.3 s per collection otherwise).
    gc.freeze()
    try:
        opened = source if isinstance(source, Source) else open_source(
            str(source), settings, RawStore.from_settings(settings).source_state())
        return _ingest(opened, settings, now or datetime.now(UTC).replace(tzinfo=None))
    finally:
        gc.unfreeze()


UNIT_ROWS = 2_000_000
"""Rows validated and staged by one task at most (unless one partition alone has more): large enough that
GX's fixed cost per run (0.1-0.3 s CPU a table, with its frames for keys and time gaps) stays small beside
the rows' (measured at 500,000 rows it was a fifth of the ingest's CPU), small enough that a unit's frames
stay within a few hundred MB (~0.5 GB of the widest table, orders)."""


@dataclass(frozen=True)
class Unit:
    """Partitions of one table that one task validates together and stages one by one."""

    table: str
    partitions: Mapping[str, Sequence[Located]]
    """Partition keys with batch rows (validated, then staged), and where their rows are in the spill."""
    leaving: Mapping[str, pa.Array] = field(default_factory=dict)
    """Stored rows the batch moves to another partition, by the partition they leave (staged, no new rows)."""
    stale: Mapping[str, pa.Array] = field(default_factory=dict)
    """Delivered rows older than the stored ones, by partition: validated, then kept out."""

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted({parse_partition_key(k)[1] for k in (*self.partitions, *self.leaving)}))


@dataclass(frozen=True)
class UnitResult:
    table: str
    failures: list[Failure]
    checked: TableChecked | None
    staged: list[StagedPartition]


@dataclass(frozen=True)
class KeyResult:
    table: str
    repeated: int
    """Rows whose key another row of the batch has too."""
    examples: tuple[Any, ...]
    moves: KeyMoves

    def failures(self, total: int) -> list[Failure]:
        """The uniqueness rule's failure over the whole table (`total` rows), if any."""
        if not self.repeated:
            return []
        key, shown = TABLES[self.table].key, tuple(show_value(v) for v in self.examples)
        return [Failure(self.table, (key,), "expect_column_values_to_be_unique",
                        failed_rows_detail(self.repeated, total, shown), self.repeated, total, shown)]


@dataclass(frozen=True)
class _Batch:
    """What every task needs, pickled once per task: small (settings, the pinned store, the spill's folder
    and the key files of the tables that foreign keys point at; no partition index)."""

    store: RawStore
    spill: BatchSpill
    settings: Settings
    now: datetime


def _ingest(source: Source, settings: Settings, now: datetime) -> IngestResult:
    store = RawStore.from_settings(settings)
    names = source.tables()
    fingerprint = batch_fingerprint(source)
    if store.loaded_batch() == fingerprint:
        manifest = store.manifest()
        return IngestResult(
            source=source.description,
            store=store.root,
            snapshot_id=manifest["snapshot_id"],
            rows={},
            partitions_written={},
            store_rows={name: t["rows"] for name, t in manifest["tables"].items()},
            rules_checked=0,
            data_docs=None,
            already_loaded=True,
        )
    from reporting.validation_page import write_validation_page

    validation = BatchValidation(settings, now, partial(write_validation_page, settings.path("validation")))
    clock = Stopwatch()
    with store.transaction() as staging:
        BatchSpill.clear_leftovers(store)
        pinned = store.pinned()
        spill = BatchSpill(pinned)
        try:
            batch = _Batch(pinned, spill, settings, now)
            _split(source, names, batch, clock)
            rows = {name: spill.tables[name].total_rows if name in spill.tables else 0 for name in names}
            batch = _Batch(pinned, spill.for_tasks(names), settings, now)
            keys = clock.engine("keys", partial(_key_checks, batch), names, "checking keys across partitions")
            units = [unit for name, checked in zip(names, keys, strict=True)
                     for unit in _plan(name, spill.tables.get(name), checked.moves)]
            batch = _Batch(pinned, spill.for_tasks(sorted({fk.table for n in names for fk in TABLES[n].foreign_keys})),
                           settings, now)
            results = clock.engine("partitions", partial(_process_unit, batch), units,
                                   "validating and staging partitions")
            for result in results:
                staging.add(result.staged)  # before any error: the transaction removes them unless committed
            _record(validation, names, rows, results, {k.table: k.failures(rows[k.table]) for k in keys}, settings)
            data_docs = clock.time("commit", validation.finish)
            written = clock.time("commit", staging.commit, fingerprint, source.state())
        except BaseException:
            _remove_after_failure(spill)
            raise
        spill.remove()
    manifest = store.manifest()
    return IngestResult(
        source=source.description,
        store=store.root,
        snapshot_id=manifest["snapshot_id"],
        rows=rows,
        partitions_written={name: written.get(name, []) for name in names},
        store_rows={name: t["rows"] for name, t in manifest["tables"].items()},
        rules_checked=validation.rules_checked,
        data_docs=data_docs,
        seconds=clock.seconds,
        cpu_seconds=clock.cpu_seconds,
        stale={name: n for name in names if (n := sum(p.stale for p in staging.staged.get(name, {}).values()))},
    )


def _remove_after_failure(spill: BatchSpill) -> None:
    """Remove a failed batch's files without hiding why it failed: on a cluster, tasks of the batch may still
    be writing into the spill while the flow gives up, and an error of that clean-up used to replace the
    batch's own in the user's terminal (the next ingest removes what is left: `BatchSpill.clear_leftovers`)."""
    try:
        spill.remove()
    except OSError as error:
        log.warning("the failed batch's staged files are not all removed (%s); the next ingest removes them", error)


def _split(source: Source, names: Sequence[str], batch: _Batch, clock: Stopwatch) -> None:
    """Cut the source into partition files: one task per piece on the engine, or, for a source that has
    no pieces (a database pull: one snapshot, one connection), a stream read here."""
    spill = batch.spill
    cut = {name: pieces(source, name) for name in names}
    work = [(name, f"{i:05d}", piece) for name in names for i, piece in enumerate(cut[name] or [])]
    for part in clock.engine("split", partial(_split_piece, batch), work, "splitting the batch into partitions"):
        spill.take(part)
    for name in names:
        if cut[name] is None:
            spill.take(clock.time("split", spill.split, name, "stream", source.batches(name),
                                  batch.store.buckets))


def _split_piece(batch: _Batch, work: tuple[str, str, Piece]) -> SplitPart:
    name, part, piece = work
    return batch.spill.split(name, part, piece.batches(), batch.store.buckets)


def _key_checks(batch: _Batch, name: str) -> KeyResult:
    """The rules across partitions, on the key column only (DuckDB, bounded by `core.sql.duckdb_connect`, which
    spills to disk rather than run out of memory): a key delivered twice in different partitions breaks
    uniqueness (the same partition's duplicates are GX's to find, but counted here for the whole table),
    and a stored row the batch re-delivers in another partition must leave its old one. A key column that
    is missing or mistyped is left to its own rules."""
    spec, spill, settings = TABLES[name], batch.spill, batch.settings
    if not spill.has_keys(name, spec.key):
        return KeyResult(name, 0, (), KeyMoves({}, {}))
    examples_wanted = settings.ingest.max_failure_examples
    con = duckdb_connect(settings)
    try:
        # Read once into DuckDB (which spills it to disk beyond its budget), then scanned as often as needed.
        con.register("spill_reader", spill.key_reader(name))
        con.execute("CREATE TEMP TABLE spill_keys AS FROM spill_reader")
        rows = fetch_one(con, "SELECT count(*) FROM spill_keys")[0]
        # A distinct count first (2/3 of the CPU of a grouping, measured): the repeated keys only if any.
        ((count, examples),) = [(0, ())] if _all_distinct(con, spec.key, rows) else con.execute(
            f"WITH repeated AS (SELECT {spec.key} AS key, count(*) AS n FROM spill_keys GROUP BY {spec.key} "
            f"HAVING n > 1) SELECT sum(n), list(key ORDER BY key)[1:{examples_wanted}] FROM repeated"
        ).fetchall()
        moves = batch.store.key_moves(name, con, "spill_keys")
    finally:
        con.close()
    return KeyResult(name, int(count or 0), tuple(examples or ()), moves)


KEY_BYTES = 64
"""About what one key takes in DuckDB's hash table of a distinct count (a string key, its hash, its slot)."""


def _all_distinct(con: duckdb.DuckDBPyConnection, key: str, rows: int) -> bool:
    """Whether every key is distinct, in as many slices of the keys' hash as keep each slice's hash table
    within half the connection's memory: a distinct count cannot spill to disk, and one over the 100M orders'
    keys asked for 1 GiB at once of a worker's 2 GiB and failed the ingest. One slice, one scan, below that."""
    limit = size_bytes(fetch_one(con, "SELECT current_setting('memory_limit')")[0])
    slices = max(1, math.ceil(rows * KEY_BYTES / (limit / 2)))
    where = [""] if slices == 1 else [f"WHERE hash({key}) % {slices} = {i}" for i in range(slices)]
    return all(fetch_one(con, f"SELECT count(*) = count(DISTINCT {key}) FROM spill_keys {w}")[0] for w in where)


def _plan(name: str, staged: StagedTable | None, moves: KeyMoves) -> list[Unit]:
    """The table's partitions packed into units of about `UNIT_ROWS` rows, bucket by bucket (a unit's
    foreign keys to `merchants` are checked against its buckets' merchants only)."""
    rows = staged.rows if staged is not None else {}
    keys = sorted({*rows, *moves.leaving}, key=lambda k: (parse_partition_key(k)[1], k))
    units: list[Unit] = []
    current: list[str] = []
    size = 0
    for key in keys:
        if current and size + rows.get(key, 0) > UNIT_ROWS:
            units.append(_unit(name, current, staged, moves))
            current, size = [], 0
        current.append(key)
        size += rows.get(key, 0)
    if current:
        units.append(_unit(name, current, staged, moves))
    return units


def _unit(name: str, keys: list[str], staged: StagedTable | None, moves: KeyMoves) -> Unit:
    files = staged.files if staged is not None else {}
    return Unit(name, {k: files[k] for k in keys if k in files},
                {k: moves.leaving[k] for k in keys if k in moves.leaving},
                {k: moves.stale[k] for k in keys if k in moves.stale})


def _process_unit(batch: _Batch, unit: Unit) -> UnitResult:
    """Validate a unit's rows with GX (foreign keys against its buckets' keys, in the batch and the store),
    then stage each partition, unless it failed. Runs in any process that reaches the store."""
    spec = TABLES[unit.table]
    parts = batch.spill.read(unit.table, unit.partitions)
    failures: list[Failure] = []
    checked = None
    if parts:
        table = concat(list(parts.values()))
        domains = {(fk.table, fk.ref_column): _domain(batch, fk, unit.buckets) for fk in spec.foreign_keys}
        checks = check_frames(spec, table, domains)
        frame = to_validation_frame(table, unit.table)
        failures, checked = _validator(batch).validate(spec, frame, checks, domains)
        del table, frame, checks
    staged = [] if failures else [
        batch.store.stage_partition(unit.table, key, parts.get(key), unit.leaving.get(key), batch.spill.ledger,
                                    unit.stale.get(key))
        for key in sorted({*parts, *unit.leaving})
    ]
    del parts
    _release_memory()
    return UnitResult(unit.table, failures, checked, staged)


_VALIDATORS: dict[tuple[Any, ...], TableValidator] = {}
_DOMAINS: dict[tuple[Any, ...], pa.Array] = {}
"""Per process (a worker validates many units of a batch): one GX context, and the foreign-key domains
its units share (a batch's token keys them, so a next batch never sees them)."""


def _validator(batch: _Batch) -> TableValidator:
    key = (batch.now, batch.settings.ingest)
    if key not in _VALIDATORS:
        _VALIDATORS.clear()
        _VALIDATORS[key] = TableValidator(batch.settings, batch.now)
        # In a worker, as `ingest` does in the flow's process: what lives now (modules, the GX context) is
        # never garbage, so each unit's collection scans only the unit's objects.
        gc.freeze()
    return _VALIDATORS[key]


def _domain(batch: _Batch, fk: ForeignKey, buckets: tuple[int, ...]) -> pa.Array:
    """The keys a foreign key may use in a unit: the referenced column's in the store and in the batch. A
    reference to a merchant stays in its bucket, so only those buckets' merchants are read."""
    scope = buckets if (fk.table, fk.ref_column) == ("merchants", "merchant_id") else None
    token = batch.spill.token
    cache_key = (token, fk.table, fk.ref_column, scope)
    if cache_key not in _DOMAINS:
        if len(_DOMAINS) > 64 or any(k[0] != token for k in _DOMAINS):
            _DOMAINS.clear()
        con = duckdb_connect(batch.settings)
        try:
            parts = [batch.store.distinct_values(fk.table, fk.ref_column, scope, con)]
        finally:
            con.close()
        if batch.spill.has_keys(fk.table, fk.ref_column):
            parts.append(batch.spill.distinct(fk.table, fk.ref_column, scope))
        _DOMAINS[cache_key] = pc.unique(pa.concat_arrays(parts))
    return _DOMAINS[cache_key]


def _record(
    validation: BatchValidation,
    names: list[str],
    rows: Mapping[str, int],
    results: list[UnitResult],
    global_failures: Mapping[str, list[Failure]],
    settings: Settings,
) -> None:
    """Each table's outcome as if validated whole: its units' failures merged, the key rule counted once
    over the whole table (`_key_checks`) in place of the units' own counts."""
    for name in names:
        mine = [r for r in results if r.table == name and r.checked is not None]
        parts = [r.failures for r in mine]
        if global_failures[name]:
            parts = [[f for f in p if f.expectation != "expect_column_values_to_be_unique"] for p in parts]
            parts.append(global_failures[name])
        failures = merge_failures(parts, rows[name], settings.ingest.max_failure_examples)
        rules = max((r.checked.rules for r in mine), default=0)
        validation.record(TableChecked(name, rows[name], rules, len(failures)), failures)


def _release_memory() -> None:
    """Hand freed memory back to the OS between tables, so the peak is one table's and not that plus
    the leftovers of the tables before it: neither Arrow's pool nor glibc's malloc does it by itself."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def time(self, stage: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn`, adding its wall and CPU time to the stage's totals."""
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3)
        self.cpu_seconds[stage] = round(self.cpu_seconds.get(stage, 0.0) + time.process_time() - cpu, 3)
        return out

    def engine(self, stage: str, fn: Callable[[Any], R], items: Sequence[Any], label: str) -> list[R]:
        """`run_partitions(fn, items)`, adding its wall time and the CPU time of this process and, on Dask,
        of the workers' tasks (measured in the task: `fn(item)` is timed where it runs) to the stage's."""
        start, cpu = time.perf_counter(), time.process_time()
        timed = run_partitions(partial(_timed, fn), items, label)
        mine = time.process_time() - cpu
        tasks = sum(seconds for _, seconds in timed)
        # On the local engine the tasks ran in this process: their CPU is already in `mine`.
        total = mine + (tasks if dask_client() is not None else 0.0)
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3)
        self.cpu_seconds[stage] = round(self.cpu_seconds.get(stage, 0.0) + total, 3)
        return [out for out, _ in timed]


def _timed(fn: Callable[[Any], R], item: Any) -> tuple[R, float]:
    cpu = time.process_time()
    out = fn(item)
    return out, time.process_time() - cpu


@flow(name="ingest")
def ingest_flow(source: str, settings: Settings) -> IngestResult:
    """Prefect shell of `ingest`: one flow run per batch, visible in the workspace's Prefect UI (bad input
    fails the run with its message; the CLI prints it as one line, see `runtime.UserErrorsOnce`)."""
    result = ingest(source, settings)
    log.info(result.describe())
    return result
