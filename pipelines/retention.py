"""`scfrisk vacuum`: the workspace's retention. Every daily refresh leaves the previous day's files behind;
this removes those older than `[retention] days` that nothing needs any more, kind by kind.

What is kept however old, and why:
- the raw store's current snapshot, and the snapshot of every version in the MLflow registry (its
  `raw_snapshot_id` tag): all versions, not only those with an alias, because any version may become the
  champion again (`scfrisk promote`, a rollback) and a model on record must stay re-creatable from its very
  data (SR 11-7). Copy-on-write makes it cheap: a snapshot costs only the partitions no other one shares;
- the snapshot the daily features were last rolled from (the next refresh compares the new data with it;
  without it, that refresh rebuilds every month instead of rolling a day);
- the live bundle, the one `scfrisk rollback` would go back to, and every bundle a line of the audit log
  names (`scfrisk replay` re-scores each logged decision with the bundle that made it; a bundle is
  self-contained, so replaying a decision needs nothing else);
- never touched: the audit log, the MLflow store and its artifacts, the risk reports (one per model
  version), the feature store's training sets (one per feature-set version, rewritten in place), and
  Prefect's database (its own retention settings).

What goes, once older than the window:
- raw store: the data files no kept snapshot reads, and the records of the snapshots no longer kept
  (`RawStore.vacuum`; `at` then names the snapshot it no longer has, instead of failing on a missing file);
- feature store: the daily `as_of=` snapshots a refresh writes (a cache: recomputed from the raw store on
  demand), but the newest of each feature-set version and the monthly ones the risk report compares
  (`[features] snapshot_months`); the daily partials of feature-set versions the code no longer computes
  (the current version's are collected by each refresh itself, `features.daily_store`);
- published bundles that are not kept above, rejected ones (kept for inspection), and the staging folders
  of publishes that stopped half-way;
- the day folders of the refresh's limits (`limits/as_of=...` holding only the limits table) and of the
  early-warning alerts and watch list (`monitor/as_of=...`), but the newest: each day's limits and alerts
  are also in the bundle published with them (kept above while a logged decision names it). The monthly
  run's limits folders, with its strategy report and backtest, stay: one a month, the record of a
  champion's strategy.

"Older than the window" is by when a thing was written (a snapshot: when it became current), so that a
run in progress (younger than the window's at least one day) is never touched. A snapshot that was current
at any time within the window stays readable, like Delta's own time travel window. Like an ingest, a vacuum
is a writer: run it when no ingest or refresh runs (the raw store refuses while one is staging).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow

from core.raw_store import RawStore
from core.settings import Settings
from core.storage import modified_time

log = logging.getLogger(__name__)

AS_OF = re.compile(r"as_of=(\d{4}-\d{2}-\d{2})T(\d{6})\.parquet$")
BUNDLE_ID = re.compile(rb'"bundle_id"\s*:\s*"([^"]+)"')
AUDIT_BLOCK = 1 << 24


@dataclass(frozen=True)
class Removal:
    """One file or folder a vacuum removes: which kind of state, where, and its bytes (a folder's files)."""

    kind: str
    path: str
    bytes: int


@dataclass
class VacuumResult:
    """What a vacuum removed (or, a dry run, would remove), and the raw snapshots it kept."""

    dry_run: bool
    cutoff: datetime
    removed: list[Removal] = field(default_factory=list)
    snapshots_kept: list[str] = field(default_factory=list)
    snapshots_dropped: list[str] = field(default_factory=list)
    protected: dict[str, str] = field(default_factory=dict)
    """Raw snapshots kept whatever their age, and why."""

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def describe(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"vacuum (kept whole: since {self.cutoff:%Y-%m-%d %H:%M} UTC): {verb} {len(self.removed)} "
                 f"file(s) or folder(s), {_size(self.bytes)}"]
        kinds: dict[str, list[Removal]] = {}
        for removal in self.removed:
            kinds.setdefault(removal.kind, []).append(removal)
        lines += [f"  {kind}: {len(items)}, {_size(sum(r.bytes for r in items))}" for kind, items in kinds.items()]
        lines.append(f"  raw snapshots: {len(self.snapshots_kept)} kept, {len(self.snapshots_dropped)} "
                     f"{'would be ' if self.dry_run else ''}dropped")
        lines += [f"  kept {snapshot}: {why}" for snapshot, why in self.protected.items()]
        if self.dry_run:
            lines += [f"  {r.bytes:>14,}  {r.path}" for r in self.removed]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB ({n:,} bytes)"


def registered_snapshots(settings: Settings) -> dict[str, str]:
    """The raw snapshot of every version of every registered model (its training run's `raw_snapshot_id`
    tag; a model of one's own table has none): snapshot -> the first version that records it."""
    if not settings.mlflow.tracking_uri and not (settings.home_dir / "mlflow.db").is_file():
        return {}  # no registry yet (and none created by looking)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client, found, token = MlflowClient(settings.tracking_uri), {}, None
    while True:
        page = client.search_model_versions(page_token=token)
        for version in page:
            try:
                snapshot = client.get_run(version.run_id).data.tags.get("raw_snapshot_id")
            except MlflowException:
                log.warning("%s v%s: its training run is gone; its raw snapshot is unknown", version.name,
                            version.version)
                continue
            if snapshot:
                found.setdefault(snapshot, f"trained {version.name} v{version.version}")
        token = page.token
        if not token:
            return found


def protected_snapshots(settings: Settings, store: RawStore) -> dict[str, str]:
    """Raw snapshots kept however old: the registered models' and the daily features' (see module doc)."""
    from features.daily_store import DailyStore
    from pipelines.refresh import partials_folder

    protected = registered_snapshots(settings)
    state = DailyStore(partials_folder(settings), store).state()
    if state and state.get("raw_snapshot_id"):
        protected.setdefault(state["raw_snapshot_id"], f"daily features as of {state['as_of']} rolled from it")
    return protected


def feature_snapshots(settings: Settings, cutoff: datetime) -> list[Removal]:
    """The feature store's `as_of=` files older than the cutoff, but the newest of each feature-set version
    and its last `[features] snapshot_months` month-start ones (what the risk report compares)."""
    from features.offline_store import OfflineStore, is_monthly

    offline = OfflineStore.from_settings(settings)
    root = offline.arrow_path(offline.location()).rstrip("/")
    if not offline.fs.exists(root):
        return []
    months = settings.features.snapshot_months
    out = []
    for folder in sorted(offline.fs.glob(f"{root}/version=*")):
        files = {path: info for path, info in offline.fs.glob(f"{folder}/as_of=*.parquet", detail=True).items()
                 if AS_OF.search(path)}
        stamps = {path: AS_OF.search(path).groups() for path in files}  # type: ignore[union-attr]
        ordered = sorted(files, key=stamps.__getitem__)
        monthly = [p for p in ordered if is_monthly(p)]
        kept = set(ordered[-1:]) | set(monthly[-months:] if months else [])
        out += [Removal("feature snapshots", path, int(files[path]["size"])) for path in ordered
                if path not in kept and modified_time(files[path]) < cutoff]
    return out


def old_daily_partials(settings: Settings, cutoff: datetime) -> list[Removal]:
    """The daily partials of feature-set versions other than the code's, untouched since the cutoff."""
    from features.definitions import feature_set_version
    from pipelines.refresh import partials_folder

    current = f"version={feature_set_version()}"
    folders = sorted(p / "daily" for p in partials_folder(settings).glob("version=*")
                     if p.name != current and (p / "daily").is_dir())
    return [Removal("old feature-set versions' daily partials", str(f), _tree_bytes(f)) for f in folders
            if _newest(f) < cutoff]


def decision_bundles(audit_log: Path) -> set[str]:
    """Every bundle a line of the audit log names, rotated files (`decisions.jsonl.1`, `.gz`) included."""
    import gzip

    used: set[bytes] = set()
    if not audit_log.parent.is_dir():
        return set()
    for path in audit_log.parent.glob(f"{audit_log.name}*"):
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as stream:
            rest = b""
            while block := stream.read(AUDIT_BLOCK):  # whole lines at a time: a year's log need not fit in memory
                lines, _, rest = (rest + block).rpartition(b"\n")
                used.update(BUNDLE_ID.findall(lines))
            used.update(BUNDLE_ID.findall(rest))
    return {bundle.decode() for bundle in used}


def old_bundles(settings: Settings, cutoff: datetime) -> list[Removal]:
    """Published bundles created before the cutoff that are not live, not the rollback's default target, and
    that no logged decision was made with; rejected and unfinished bundles older than the cutoff."""
    from pipelines.publish import list_bundles
    from serving.bundle import BUNDLES_DIR, current_bundle_id, read_manifest

    published = settings.path("published")
    bundles = list_bundles(published)
    live = current_bundle_id(published)
    kept = {live} | set([b for b in bundles if live is None or b < live][-1:]) | decision_bundles(settings.audit_log)
    folders = [published / BUNDLES_DIR / b for b in bundles if b not in kept]
    out = [Removal("published bundles", str(f), _tree_bytes(f)) for f in folders
           if datetime.fromisoformat(read_manifest(f)["created_at"]) < cutoff]
    rejected = published / "rejected"
    if rejected.is_dir():
        out += [Removal("rejected bundles", str(p), _tree_bytes(p)) for p in sorted(rejected.iterdir())
                if _newest(p) < cutoff]
    # A publish that stopped before its bundle was checked and moved in leaves its staging folder.
    out += [Removal("unfinished bundles", str(p), _tree_bytes(p)) for p in sorted(published.glob(".staging-*"))
            if _newest(p) < cutoff]
    return out


def old_days(folder: Path, kind: str, cutoff: datetime, only: str | None = None) -> list[Removal]:
    """A folder's `as_of=` day folders untouched since the cutoff, but the newest; with `only`, just those
    that hold that one file."""
    days = sorted(folder.glob("as_of=*")) if folder.is_dir() else []
    return [Removal(kind, str(day), _tree_bytes(day)) for day in days[:-1]
            if _newest(day) < cutoff and (only is None or [p.name for p in day.iterdir()] == [only])]


def vacuum(settings: Settings, dry_run: bool = False, now: datetime | None = None) -> VacuumResult:
    """Remove what the workspace no longer needs (module doc); `now`: the clock (the time of the run)."""
    from pipelines.limits import limits_path

    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.retention.days)
    store = RawStore.from_settings(settings)
    protected = protected_snapshots(settings, store)
    raw = store.vacuum(protected, cutoff, dry_run)
    removed = [Removal("raw store", path, size) for path, size in sorted(raw.files.items())]
    removed += feature_snapshots(settings, cutoff) + old_daily_partials(settings, cutoff)
    removed += old_bundles(settings, cutoff)
    daily_limits = limits_path(settings, cutoff)
    removed += old_days(daily_limits.parents[1], "limits", cutoff, daily_limits.name)
    removed += old_days(settings.home_dir / "monitor", "early-warning alerts", cutoff)
    if not dry_run:
        from features.offline_store import OfflineStore

        offline = OfflineStore.from_settings(settings, store)
        for removal in removed:
            if removal.kind == "feature snapshots":
                offline.fs.rm_file(removal.path)
            elif removal.kind != "raw store":  # the store removed its own
                shutil.rmtree(removal.path)
    still = {snapshot: why for snapshot, why in protected.items() if snapshot in raw.kept}
    return VacuumResult(dry_run, cutoff, removed, raw.kept, raw.dropped, still)


@flow(name="vacuum")
def vacuum_flow(settings: Settings, dry_run: bool = False) -> VacuumResult:
    """Prefect shell of `vacuum`: a flow run records what each vacuum removed."""
    result = vacuum(settings, dry_run)
    log.info(result.describe())
    return result


def _newest(folder: Path) -> datetime:
    """When anything in a folder was last written."""
    times = [p.stat().st_mtime for p in (folder, *folder.rglob("*"))]
    return datetime.fromtimestamp(max(times), UTC)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

