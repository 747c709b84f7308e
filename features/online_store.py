"""Online store: the latest feature vector per merchant, the one the service scores.

`publish_online` copies the offline snapshot of one as_of to `<feature_store>/online/features.parquet`, so
serving returns exactly what training saw for that as_of. The publisher puts it in the bundle, where the
service reads it once and precomputes every merchant's answer (`serving.bundle`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from features.offline_store import OfflineStore

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
