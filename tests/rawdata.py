"""Write hand-made tables into a raw store, for tests that need exact facts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa

from core.raw_store import RawStore
from core.schemas import TABLES


def write_raw_store(root: Path, tables: dict[str, list[dict] | pd.DataFrame]) -> RawStore:
    """A new raw store (replacing what was there) holding these rows; unspecified columns are empty."""
    shutil.rmtree(root, ignore_errors=True)
    store = RawStore(root)
    with store.transaction() as batch:
        for name, rows in tables.items():
            spec = TABLES[name]
            frame = pd.DataFrame(rows)
            for column in spec.columns:
                if column.name not in frame:
                    frame[column.name] = None
            for column in spec.timestamp_columns:
                frame[column] = pd.to_datetime(frame[column])
            table = pa.Table.from_pandas(frame[[c.name for c in spec.columns]], preserve_index=False)
            batch.stage(name, table.cast(spec.arrow_schema))
        batch.commit()
    return store
