"""`scfrisk refresh`: the daily refresh, one Prefect flow from the day's pull to a live bundle.

pull the day (a batch folder or the platform's database) -> raw store (the ingest: validated whole, all or
nothing) -> online features as of the next midnight, rolled forward from the daily partials and prefix sums
(`features.daily_store`), no full rebuild -> every merchant re-scored by the champion, limits recomputed ->
the early warning on every live loan (`pipelines.monitor.watch`, the `scfrisk monitor` check) -> the day's
snapshot of the features (offline store, online file) -> one new bundle with the day's features, limits and
alerts, switched in by the pointer the service polls (`serving.live`: requests in flight keep the bundle they
started with).

The monitor is a step of the refresh rather than a deployment of its own: its alerts then always belong
to the bundle's features and limits (a separate daily run would publish a second bundle, and between the
two the service would apply the previous day's freezes to the new limits, or none). A failed check fails
the day: the previous bundle, with its alerts, stays live.

Training, monthly snapshots, the risk and strategy reports are the monthly run's (`scfrisk run`); the
refresh reuses the champion and its report. A failure at any step publishes nothing: the live bundle stays.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.deployments.runner import RunnerDeployment

from core.batch import require_tables
from core.raw_store import RawStore
from core.settings import Settings
from core.sources import open_source
from core.storage import is_local
from pipelines.ingest import Stopwatch, ingest
from pipelines.runtime import scheduled

log = logging.getLogger(__name__)


@dataclass
class RefreshSummary:
    as_of: pd.Timestamp
    snapshot_id: str
    bundle_id: str
    merchants: int
    model_version: str
    features: str
    """What the feature step did (`DailyRefresh.describe`)."""
    monitor: str
    """What the early warning found (`MonitorResult.describe`)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per step: pull, features, score, monitor, publish."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    feature_cpu_seconds: dict[str, float] = field(default_factory=dict)
    pulled: dict[str, int] = field(default_factory=dict)
    """Rows the pull read per table (`IngestResult.rows`)."""
    """CPU seconds of the feature step's phases (`DailyRefresh.cpu_seconds`)."""

    def describe(self) -> str:
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return (f"refreshed to {self.as_of:%Y-%m-%d}: bundle {self.bundle_id} live (champion v{self.model_version}, "
                f"{self.merchants:,} merchants re-scored, raw snapshot {self.snapshot_id})\n  {self.features}\n"
                f"  {self.monitor}\n  {steps}")


def partials_folder(settings: Settings) -> Path:
    """Where the daily partials live. They are a cache a refresh rebuilds whole when it is missing, a DuckDB
    database (`features.daily_store`): on this machine's disk, under the workspace, when the feature store is not."""
    if is_local(settings.store_url("feature_store")):
        return settings.path("feature_store")
    return settings.home_dir / "features"


def refresh(settings: Settings, source: str | Path, as_of: pd.Timestamp | None = None) -> RefreshSummary:
    """The daily refresh (see the module docstring); `as_of` defaults to the midnight after the newest order."""
    from credit.policy import load_policy
    from explanation.reason_codes import ReasonCodeIndex
    from features.daily_store import DailyStore
    from features.offline_store import OfflineStore
    from features.online_store import publish_online
    from pipelines.limits import champion, limits_path, limits_table
    from pipelines.monitor import default_as_of, watch
    from pipelines.publish import BundleParts, publish
    from pipelines.report import report_file

    # The pull that follows the last one the raw store committed (a database's watermarks), as `ingest` opens it.
    before = RawStore.from_settings(settings)
    batch = open_source(str(source), settings, before.source_state())
    require_tables("refresh", before, batch.tables(), batch.description)
    steps = Stopwatch()
    pulled = steps.time("pull", ingest, batch, settings)
    log.info(pulled.describe())
    store = RawStore.from_settings(settings)
    as_of = pd.Timestamp(as_of if as_of is not None else default_as_of(store))  # the midnight after the newest order

    offline = OfflineStore.from_settings(settings, store)

    daily = steps.time("features", DailyStore(partials_folder(settings), store).refresh, as_of)
    found = champion(settings)
    model, version = found.model, found.version
    policy = load_policy(settings.policy_file)

    def score() -> tuple[Path, ReasonCodeIndex]:
        limits = limits_table(daily.features, model, version, policy)
        path = limits_path(settings, as_of.to_pydatetime())
        path.parent.mkdir(parents=True, exist_ok=True)
        limits.to_parquet(path, index=False)
        return path, ReasonCodeIndex.for_population(model, daily.features, version)

    limits, reasons = steps.time("score", score)
    day = steps.time("monitor", watch, settings, store, model, policy, as_of.to_pydatetime(), daily.features)
    report = report_file(settings, version)

    def snapshot() -> Path | str:
        """The day's vector in the offline store (what a monthly run would read as of that midnight) and as
        the online file the bundle carries: written once every step before has succeeded."""
        offline.write(daily.features, offline.snapshot_path(as_of), offline.metadata(as_of.isoformat()))
        return publish_online(offline, as_of)

    online = steps.time("snapshot", snapshot)

    def switch_in() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return publish(BundleParts(
                model_dir=model.save(Path(tmp) / "model"),
                model_version=version,
                feature_set_version=offline.version,
                features_as_of=as_of.isoformat(),
                online_features=offline.local_copy(online, Path(tmp)),
                limits=limits,
                reason_codes=reasons,
                policy_file=Path(settings.policy_file),
                risk_report=report if report.is_file() else None,
                alerts=day.alerts,
                alerts_as_of=as_of.isoformat(),
            ), settings)

    bundle_id = steps.time("publish", switch_in)
    watched = day.published(settings, bundle_id)
    return RefreshSummary(as_of, store.snapshot_id or "", bundle_id, len(daily.features), version,
                          daily.describe(), watched.describe().replace("\n", "\n  "), steps.seconds,
                          steps.cpu_seconds, daily.cpu_seconds, dict(pulled.rows))


@flow(name="scfrisk-refresh", log_prints=False)
def refresh_flow(settings: Settings, source: str, as_of: str | None = None) -> RefreshSummary:
    """Prefect shell of `refresh`: one flow run per day."""
    summary = refresh(settings, source, pd.Timestamp(as_of) if as_of else None)
    log.info(summary.describe())
    return summary


def daily_deployment(settings: Settings, source: Path, cron: str = "0 2 * * *") -> RunnerDeployment:
    """`scfrisk refresh` as a Prefect deployment on a daily cron schedule, reading the folder the day's
    pull lands in (served by `scfrisk schedule --flow refresh`)."""
    return scheduled(refresh_flow, "daily", settings, source, cron, "0 2 * * *")
