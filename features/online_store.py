"""Online store: the latest feature vector per merchant, looked up in-process in microseconds.

`publish_online` copies the offline snapshot of one as_of to `<feature_store>/online/features.parquet`, so
serving returns exactly what training saw for that as_of. `OnlineStore.load` reads it once into a dict
of ready-made rows; `lookup` is then one dict access and a shallow copy.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from core.errors import ScfriskError
from features.definitions import feature_names
from features.offline_store import OfflineStore, read_metadata

ONLINE_FILE = Path("online") / "features.parquet"


def publish_online(offline: OfflineStore, as_of: pd.Timestamp | str) -> Path:
    """Materialise (or reuse) the offline snapshot for as_of and make it the served one, atomically."""
    source = offline.materialize(as_of)
    target = offline.root / ONLINE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def _python(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class OnlineStore:
    """Feature vectors keyed by merchant_id, all in memory."""

    def __init__(self, rows: dict[str, dict[str, object]], metadata: dict[str, str]) -> None:
        self._rows = rows
        self.metadata = metadata

    @classmethod
    def load(cls, feature_store: Path | str) -> OnlineStore:
        path = Path(feature_store) / ONLINE_FILE
        if not path.is_file():
            raise ScfriskError(f"no online features at {path}; run `scfrisk features materialize --as-of T`")
        table = pq.read_table(path)
        names = feature_names()
        columns = {name: table.column(name).to_pylist() for name in names}
        ids = table.column("merchant_id").to_pylist()
        rows = {
            merchant: {name: _python(columns[name][i]) for name in names} for i, merchant in enumerate(ids)
        }
        return cls(rows, read_metadata(path))

    @property
    def as_of(self) -> pd.Timestamp:
        return pd.Timestamp(self.metadata["as_of"])

    @property
    def merchant_ids(self) -> list[str]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, merchant_id: str) -> dict[str, object] | None:
        """Features of one merchant as of the published as_of, or None for an unknown merchant."""
        row = self._rows.get(merchant_id)
        return None if row is None else dict(row)
