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
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow
from rich.progress import Progress

from core.raw_store import RawStore
from core.schemas import TABLES
from core.settings import Settings
from core.sources import Source, open_source, read_table

if TYPE_CHECKING:
    from core.rules import ReferenceKeys

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    """Wall seconds per stage (read, validate, write)."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU seconds per stage, all threads: the stable figure on a shared machine."""

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
            lines.append(
                f"  {name}: {rows:,} rows in batch, {written}, {self.store_rows.get(name, 0):,} rows stored"
            )
        report = (
            f"validation report: {self.data_docs}" if self.data_docs else "no validation page for a passed batch"
        )
        lines.append(f"snapshot {self.snapshot_id}; {self.rules_checked} validation rules passed; {report}")
        return "\n".join(lines)


def ingest(source: Source | Path | str, settings: Settings, now: datetime | None = None) -> IngestResult:
    """Validate the batch and upsert it, one table at a time; nothing is swapped in unless all passed.

    Tables stream in dependency order: read, validate (foreign keys against the keys of the tables
    before it plus the store), stage its partitions, then drop it, so only one table is in memory.
    `now` bounds timestamps. The batch that made the store's current snapshot is not ingested again
    (a rerun of the pipeline after a later stage failed): it would pass and change nothing.
    """
    # Objects alive before the batch never become garbage here: freezing them makes each collection in
    # `_release_memory` scan only the batch's objects (0.3 s per collection otherwise).
    gc.freeze()
    try:
        opened = source if isinstance(source, Source) else open_source(
            str(source), settings, RawStore(settings.path("raw_store")).source_state())
        return _ingest(opened, settings, now or datetime.now(UTC).replace(tzinfo=None))
    finally:
        gc.unfreeze()


def _ingest(source: Source, settings: Settings, now: datetime) -> IngestResult:
    store = RawStore(settings.path("raw_store"), buckets=settings.compute.merchant_buckets)
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
    from core.validation import BatchValidation, check_frames, to_validation_frame
    from reporting.validation_page import write_validation_page

    validation = BatchValidation(settings, now, partial(write_validation_page, settings.path("validation")))
    clock = _Stopwatch()
    domains: dict[tuple[str, str], pa.Array] = {}
    rows: dict[str, int] = {}
    with store.transaction() as staging, Progress(transient=True) as progress:
        task = progress.add_task("ingesting", total=len(names))
        for name in names:
            spec = TABLES[name]
            table = clock.time("read", read_table, source, name)
            rows[name] = table.num_rows
            for fk in spec.foreign_keys:
                if (fk.table, fk.ref_column) not in domains:
                    domains[(fk.table, fk.ref_column)] = key_domain(fk.table, fk.ref_column, None, store)
            checks = clock.time("validate", check_frames, spec, table, domains)
            domains.update({(t, c): key_domain(t, c, table, store) for t, c in REFERENCED if t == name})
            frame = clock.time("validate", to_validation_frame, table, name)
            del table  # GX's pandas copy is the only one while it validates: reading again is cheaper
            _release_memory()
            clock.time("validate", validation.validate, spec, frame, checks, domains)
            del frame, checks
            _release_memory()
            if not validation.failures:  # once the batch is rejected, staging more is wasted work
                clock.time("write", staging.stage, name, clock.time("read", read_table, source, name))
                _release_memory()
            progress.advance(task)
        data_docs = clock.time("validate", validation.finish)
        written = clock.time("write", staging.commit, fingerprint, source.state())
    manifest = store.manifest()
    return IngestResult(
        source=source.description,
        store=store.root,
        snapshot_id=manifest["snapshot_id"],
        rows=rows,
        partitions_written=written,
        store_rows={name: t["rows"] for name, t in manifest["tables"].items()},
        rules_checked=validation.rules_checked,
        data_docs=data_docs,
        seconds=clock.seconds,
        cpu_seconds=clock.cpu_seconds,
    )


def _release_memory() -> None:
    """Hand freed memory back to the OS between tables, so the peak is one table's and not that plus
    the leftovers of the tables before it: neither Arrow's pool nor glibc's malloc does it by itself."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Stopwatch:
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


@flow(name="ingest")
def ingest_flow(source: str, settings: Settings) -> IngestResult:
    """Prefect shell of `ingest`: one flow run per batch, visible in the workspace's Prefect UI (bad input
    fails the run with its message; the CLI prints it as one line, see `runtime.UserErrorsOnce`)."""
    result = ingest(source, settings)
    log.info(result.describe())
    return result
