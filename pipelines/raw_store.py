"""Layout of the validated raw store: `<root>/<table>/month=YYYY-MM/part-0.parquet` plus a manifest.

Every table is partitioned by the month of its own time column (see `pipelines.schemas`). Readers glob
`table_glob(name)` (DuckDB: `read_parquet(glob)`), and never depend on the partition column. The manifest
records what is in the store; its `snapshot_id` changes exactly when the data does, so downstream stages
can reuse work computed on the same snapshot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "_manifest.json"


class RawStore:
    """Read-side view of a raw store folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def table_dir(self, name: str) -> Path:
        return self.root / name

    def table_glob(self, name: str) -> str:
        return str(self.table_dir(name) / "month=*" / "*.parquet")

    def has_table(self, name: str) -> bool:
        return any(self.table_dir(name).glob("month=*/*.parquet"))

    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {"snapshot_id": None, "tables": {}}

    @property
    def snapshot_id(self) -> str | None:
        return self.manifest()["snapshot_id"]
