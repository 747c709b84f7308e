"""`scfrisk features build`: after each ingest, bring the feature store up to date (Prefect shell).

Training set, monthly snapshots and the online vector are each reused when the raw snapshot and the
feature definitions are unchanged, so a rerun after no new data costs only the checks. Each is computed per
merchant bucket on the flow's engine (`pipelines.compute`): a loop here, or tasks on Dask workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import flow

from core.errors import ScfriskError
from core.settings import Settings
from features.offline_store import OfflineStore, PartitionMap, in_turn, month_starts
from features.online_store import publish_online
from pipelines.compute import run_partitions

log = logging.getLogger(__name__)


@dataclass
class FeatureBuild:
    version: str
    training_set: Path | str
    online: Path | str
    """A path in a local feature store, a URL on object storage (`OfflineStore.local_copy` fetches it)."""
    online_as_of: pd.Timestamp
    snapshots: list[Path | str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"feature set {self.version}: training set {self.training_set}, {len(self.snapshots)} monthly "
            f"snapshots, online features as of {self.online_as_of:%Y-%m-%d %H:%M} in {self.online}"
        )


def build_features(settings: Settings, online_as_of: pd.Timestamp | None = None,
                   map_parts: PartitionMap = in_turn) -> FeatureBuild:
    """`map_parts` runs each file's merchant buckets (`OfflineStore`)."""
    offline = OfflineStore.from_settings(settings, map_parts=map_parts)
    store = offline.raw_store
    months = month_starts(store)
    if not months:
        raise ScfriskError(f"raw store {store.root} has no orders; nothing to build features from")
    online_as_of = pd.Timestamp(online_as_of) if online_as_of is not None else months[-1]
    training_set = offline.training_set(settings.model.label_horizon_months)
    snapshots = ([offline.materialize(m) for m in months[-settings.features.snapshot_months:]]
                 if settings.features.snapshot_months else [])
    offline.materialize(online_as_of)  # on the engine; publishing then copies the current snapshot
    return FeatureBuild(version=offline.version, training_set=training_set, snapshots=snapshots,
                        online=publish_online(offline, online_as_of), online_as_of=online_as_of)


@flow(name="features-build")
def build_features_flow(settings: Settings, online_as_of: str | None = None) -> FeatureBuild:
    """Prefect shell of `build_features`, on the flow's engine (`pipelines.compute.on_engine`)."""
    result = build_features(settings, pd.Timestamp(online_as_of) if online_as_of else None, run_partitions)
    log.info(result.describe())
    return result
