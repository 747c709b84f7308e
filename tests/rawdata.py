"""Write hand-made tables into a raw store folder in its layout, for tests that need exact facts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.raw_store import MANIFEST, RawStore
from core.schemas import TABLES


def write_raw_store(root: Path, tables: dict[str, list[dict] | pd.DataFrame]) -> RawStore:
    """One Parquet file per table and month of its time column (replacing what was there); unspecified
    columns are empty."""
    digest = hashlib.sha256()
    counts = {}
    for name, rows in tables.items():
        spec = TABLES[name]
        frame = pd.DataFrame(rows)
        for column in spec.columns:
            if column.name not in frame:
                frame[column.name] = None
        for column in spec.timestamp_columns:
            frame[column] = pd.to_datetime(frame[column])
        table = pa.Table.from_pandas(frame[[c.name for c in spec.columns]], preserve_index=False)
        table = table.cast(spec.arrow_schema)
        months = frame[spec.time_column].dt.strftime("%Y-%m")
        shutil.rmtree(root / name, ignore_errors=True)
        for month in sorted(months.unique()):
            folder = root / name / f"month={month}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(pa.array((months == month).to_numpy())), folder / "part-0.parquet")
        digest.update(name.encode() + pd.util.hash_pandas_object(frame.astype(str)).values.tobytes())
        counts[name] = len(frame)
    manifest = {"snapshot_id": digest.hexdigest()[:16], "tables": counts}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return RawStore(root)
