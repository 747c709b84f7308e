"""Layout of the validated raw store: `<root>/<table>/month=YYYY-MM/part-0.parquet` plus a manifest.

Every table is partitioned by the month of its own time column (see `core.schemas`). Readers glob
`table_glob(name)` (DuckDB: `read_parquet(glob)`), and never depend on the partition column. The manifest
records what is in the store; its `snapshot_id` changes exactly when the data does, so downstream stages
can reuse work computed on the same snapshot. It also names the batch (a fingerprint of its files) whose
commit made that snapshot, so the same batch is not ingested twice.

Writes are all or nothing and incremental: only the partitions a batch touches are rebuilt (upserted by
the table's key, sorted by it, written deterministically) in a staging folder, then renamed into place,
and the manifest is written last. Re-writing identical data leaves every byte as it was.

A crash between the first rename and the manifest would leave some months new and some old, so a commit
first writes a journal (the swaps to make and the manifest to end with). The next use of the store rolls
an unfinished journal forward (each swap is idempotent), so a reader never sees half a batch for longer
than the crash itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.files import file_sha256
from core.schemas import TABLES, TableSpec

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
STAGING = "_staging"
JOURNAL = "_commit.json"
PART = "part-0.parquet"


class RawStore:
    """A raw store folder: read-side paths and manifest, plus the transactional batch write."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def table_dir(self, name: str) -> Path:
        return self.root / name

    def table_glob(self, name: str) -> str:
        return str(self.table_dir(name) / "month=*" / "*.parquet")

    def has_table(self, name: str) -> bool:
        return any(self.table_dir(name).glob("month=*/*.parquet"))

    def manifest(self) -> dict[str, Any]:
        """What the store holds (after finishing an interrupted commit, if there is one)."""
        self.recover()
        path = self.root / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {"snapshot_id": None, "tables": {}}

    def recover(self) -> bool:
        """Roll an interrupted commit forward from its journal; True if there was one to finish."""
        if not (self.root / JOURNAL).is_file():
            return False
        log.warning("raw store %s: finishing a commit that was interrupted", self.root)
        self._apply_journal()
        return True

    def _apply_journal(self) -> None:
        """Make the journal's swaps (each idempotent), write its manifest, then drop journal and staging."""
        journal = self.root / JOURNAL
        plan = json.loads(journal.read_text())
        for name, month in plan["swaps"]:
            self._swap_in(self.root / STAGING / name, name, month)
        _write_json(self.root / MANIFEST, plan["manifest"])
        journal.unlink()
        shutil.rmtree(self.root / STAGING, ignore_errors=True)

    @property
    def snapshot_id(self) -> str | None:
        return self.manifest()["snapshot_id"]

    def loaded_batch(self) -> str | None:
        """Fingerprint of the batch whose commit made the current snapshot (None if unknown)."""
        return self.manifest().get("batch")

    def distinct_values(self, name: str, column: str) -> pa.Array:
        """Every stored value of a column (the domain of foreign keys pointing at it)."""
        if not self.has_table(name):
            return pa.array([], type=TABLES[name].column_index[column].type)
        sql = f"SELECT DISTINCT {column} FROM read_parquet('{self.table_glob(name)}')"
        return duckdb.sql(sql).to_arrow_table().column(0).combine_chunks()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A batch write: stage tables one at a time, then `commit`; the staging folder never outlives it."""
        self.recover()
        staging = self.root / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        try:
            yield Transaction(self, staging)
        finally:
            if not (self.root / JOURNAL).is_file():  # a journal's staged files are what finishes it
                shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, spec: TableSpec, table: pa.Table, out: Path) -> dict[str, dict[str, Any]]:
        """Rebuild every partition the batch touches under `out`; an emptied partition maps to {}.

        One pass over the batch: its rows ordered by (month, key) once, then taken one month at a time
        (a month's copy is the extra memory).
        """
        table = table.select([c.name for c in spec.columns]).cast(spec.arrow_schema)
        time = table.column(spec.time_column)
        month_ids = pc.add(pc.multiply(pc.year(time), 12), pc.subtract(pc.month(time), 1))
        order = pc.sort_indices(
            pa.table({"month": month_ids, "key": table.column(spec.key)}),
            sort_keys=[("month", "ascending"), ("key", "ascending")],
        )
        sorted_ids = month_ids.take(order).to_numpy()
        ids, starts = np.unique(sorted_ids, return_index=True)
        stops = [*starts[1:], len(sorted_ids)]
        rows = {_month(i): order[start:stop] for i, start, stop in zip(ids, starts, stops, strict=True)}
        con = duckdb.connect()
        con.register("batch_keys", table.select([spec.key]))
        if self.has_table(spec.name):
            # A re-delivered row whose time moved to another month must leave its old partition.
            moved = con.sql(
                f"SELECT DISTINCT regexp_extract(filename, 'month=([0-9-]+)', 1) "
                f"FROM read_parquet('{self.table_glob(spec.name)}', filename=true) s "
                f"SEMI JOIN batch_keys b ON s.{spec.key} = b.{spec.key}"
            ).fetchall()
            rows.update({m: order[:0] for (m,) in moved if m not in rows})
        staged: dict[str, dict[str, Any]] = {}
        for m, indices in sorted(rows.items()):
            merged = table.take(indices)
            existing = self.table_dir(spec.name) / f"month={m}" / PART
            if existing.is_file():
                kept = con.sql(
                    f"SELECT {', '.join(table.column_names)} FROM read_parquet('{existing}') s "
                    f"ANTI JOIN batch_keys b ON s.{spec.key} = b.{spec.key}"
                ).to_arrow_table()
                merged = pa.concat_tables([kept.cast(spec.arrow_schema), merged]).sort_by(spec.key)
            if merged.num_rows == 0:
                staged[m] = {}
                continue
            path = out / f"month={m}" / PART
            path.parent.mkdir(parents=True, exist_ok=True)
            # One chunk per column, so the bytes depend on the rows only, not on how they were read.
            pq.write_table(merged.combine_chunks(), path, compression="zstd", row_group_size=1 << 20)
            staged[m] = {"rows": merged.num_rows, "sha256": file_sha256(path)}
        con.close()
        return staged

    def _swap_in(self, staging: Path, name: str, month: str) -> None:
        """Move a staged partition into place, or remove an emptied one; a no-op once done (see `recover`)."""
        target = self.table_dir(name) / f"month={month}"
        staged = staging / f"month={month}" / PART
        if staged.is_file():
            target.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target / PART)
        elif not (staging / f"month={month}").is_dir():  # staged as emptied (a moved file leaves its folder)
            shutil.rmtree(target, ignore_errors=True)


class Transaction:
    """The tables of one batch staged so far; `commit` swaps every touched partition in, manifest last."""

    def __init__(self, store: RawStore, staging: Path) -> None:
        self.store = store
        self.staging = staging
        self.staged: dict[str, dict[str, dict[str, Any]]] = {}

    def stage(self, name: str, table: pa.Table) -> None:
        """Write a validated table's touched partitions to staging (schema-conformed, keys unique)."""
        self.staged[name] = self.store._stage(TABLES[name], table, self.staging / name)

    def commit(self, batch: str | None = None) -> dict[str, list[str]]:
        """Swap the staged partitions in; return the months rewritten per table.

        `batch` (a fingerprint of the batch's files and rules) is recorded as the one that made the snapshot:
        `loaded_batch` then tells a caller that re-ingesting it would change nothing. That holds too when
        this batch changed nothing (its data already stored, checked by rules that changed since).
        """
        old = self.store.manifest()
        manifest = _next_manifest(old, self.staged)
        changed = {
            name: [m for m, part in parts.items() if _entry(old, name, m) != part.get("sha256")]
            for name, parts in self.staged.items()
        }
        if manifest["snapshot_id"] != old["snapshot_id"]:  # else every byte stays as it is
            manifest["batch"] = batch
            swaps = [(name, month) for name, months in changed.items() for month in months]
            _write_json(self.store.root / JOURNAL, {"swaps": swaps, "manifest": manifest})
            self.store._apply_journal()
        elif batch is not None and old.get("batch") != batch:
            _write_json(self.store.root / MANIFEST, {**old, "batch": batch})
        return changed


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write whole or not at all (a reader never sees a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _month(month_id: int) -> str:
    return f"{month_id // 12:04d}-{month_id % 12 + 1:02d}"


def _entry(manifest: dict[str, Any], name: str, month: str) -> str | None:
    return manifest["tables"].get(name, {}).get("partitions", {}).get(month, {}).get("sha256")


def _next_manifest(old: dict[str, Any], staged: Mapping[str, Mapping[str, dict[str, Any]]]) -> dict[str, Any]:
    """The manifest after the swap; `snapshot_id` hashes every partition's content hash."""
    tables = json.loads(json.dumps(old["tables"]))
    for name, parts in staged.items():
        partitions = tables.setdefault(name, {"partitions": {}})["partitions"]
        for month, part in parts.items():
            if part:
                partitions[month] = part
            else:
                partitions.pop(month, None)
        tables[name]["partitions"] = dict(sorted(partitions.items()))
        tables[name]["rows"] = sum(p["rows"] for p in partitions.values())
    snapshot = hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]
    return {"snapshot_id": snapshot, "tables": dict(sorted(tables.items()))}
