"""Online store: the latest feature vector per merchant, the one the service scores.

`publish_online` copies the offline snapshot of one as_of to `<feature_store>/online/features.parquet`, so
serving returns exactly what training saw for that as_of. The publisher puts it in the bundle, where the
service reads it once and precomputes every merchant's answer (`serving.bundle`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from features.offline_store import OfflineStore

ONLINE_FILE = Path("online") / "features.parquet"


def publish_online(offline: OfflineStore, as_of: pd.Timestamp | str) -> Path | str:
    """Materialise (or reuse) the offline snapshot for as_of and make it the served one, atomically."""
    return offline.copy(offline.materialize(as_of), offline.location(*ONLINE_FILE.parts))
