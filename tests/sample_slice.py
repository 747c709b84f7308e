"""The sample platform cut to its first merchants, for tests that load it into a database and a raw store."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core.schemas import TABLES, conform
from tests.conftest import SAMPLE


def sample_slice(merchants: int) -> dict[str, pa.Table]:
    """Every table of the sample for its first merchants, in the data model's exact schema."""
    ids = pads.dataset(SAMPLE / "merchants").to_table(columns=["merchant_id"]).column(0).to_pylist()
    keep = pa.array(sorted(ids)[:merchants])
    tables = {}
    for name, spec in TABLES.items():
        table = pads.dataset(SAMPLE / name).to_table(filter=pc.field("merchant_id").isin(keep))
        tables[name] = conform(table, spec).select([c.name for c in spec.columns]).cast(spec.arrow_schema)
    return tables


def changed_at(table: pa.Table, name: str) -> pa.ChunkedArray:
    """Each row's change time: `updated_at`, or the time column while the row never changed."""
    spec = TABLES[name]
    return pc.coalesce(table[spec.change_column], table[spec.time_column])


def latest_change(table: pa.Table, name: str) -> datetime:
    return pc.max(changed_at(table, name)).as_py()


def write_folder(folder: Path, tables: dict[str, pa.Table]) -> Path:
    """A batch folder of the tables, one Parquet file each."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, folder / f"{name}.parquet")
    return folder
