"""The daily refresh: incremental online features equal a full rebuild, and `scfrisk refresh` end to end
publishes a bundle the running service switches to under traffic, with no failed request."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import httpx
import numpy as np
import pandas as pd
import pytest

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.settings import ServiceConfig, Settings
from features.daily_store import DailyStore
from features.definitions import FEATURES
from features.offline_store import OfflineStore
from pipelines.ingest import ingest
from testkit.daily import split_day

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "platform"
DAY = pd.Timestamp("2025-10-15")
MERCHANTS = 600


def assert_same_features(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Every feature of every merchant: categories equal, numbers equal to 1e-12 (relative above 1), the
    same ones unknown."""
    assert list(got.columns) == list(want.columns)
    assert got["merchant_id"].tolist() == want["merchant_id"].tolist()
    assert (got["as_of"] == want["as_of"]).all()
    for f in FEATURES:
        a, b = got[f.name], want[f.name]
        if f.kind == "categorical":
            assert a.fillna("<none>").tolist() == b.fillna("<none>").tolist(), f.name
            continue
        a, b = a.to_numpy(float), b.to_numpy(float)
        assert (np.isnan(a) == np.isnan(b)).all(), f"{f.name}: unknown for other merchants"
        known = ~np.isnan(b)
        gap = np.abs(a[known] - b[known]) / np.maximum(1.0, np.abs(b[known]))
        assert gap.max(initial=0.0) <= 1e-12, f"{f.name}: off by {gap.max():.3g}"


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, Path]:
    """The sample's first 600 merchants cut at DAY: the base before it, the day's pull."""
    root = tmp_path_factory.mktemp("days")
    counts = split_day(SAMPLE, DAY, root / "base", root / "day", merchants=MERCHANTS)
    con = duckdb.connect()
    older = con.execute(f"SELECT count(*) FROM '{root}/day/orders.parquet' WHERE ordered_at < ?", [DAY]).fetchone()[0]
    assert counts["orders"]["day"] > older > 0  # new orders, and older ones whose state changed that day
    return {"base": root / "base", "day": root / "day"}


def test_refresh_after_a_day_equals_a_full_rebuild_every_feature_every_merchant(days, settings, tmp_path):
    ingest(days["base"], settings)
    store = RawStore(settings.path("raw_store"))
    daily = DailyStore(settings.path("feature_store"), store)
    first = daily.refresh(DAY)
    assert first.full
    assert_same_features(first.features, OfflineStore(settings.path("feature_store"), store).read(DAY))

    pulled = ingest(days["day"], settings)
    assert "merchants: 0 rows in batch, unchanged" in pulled.describe()  # a day with no new merchant
    store = RawStore(settings.path("raw_store"))
    after = DailyStore(settings.path("feature_store"), store).refresh(DAY + pd.Timedelta(days=1))
    assert not after.full
    # The day's month, and the older months whose orders were refunded, delivered... that day; not the rest.
    months = after.recomputed["orders"]
    assert "2025-10" in months and any(m < "2025-10" for m in months) and len(months) < 12
    assert 0 < after.days["orders"] < len(after.features) * len(months)  # the day's pairs, not whole months
    full = OfflineStore(settings.path("feature_store"), store).read(DAY + pd.Timedelta(days=1))
    assert_same_features(after.features, full)
    _the_monitor_takes_the_online_vector_for_the_features_now(store, after.features, DAY + pd.Timedelta(days=1))

    # Days roll with no new pull: windows move, masks flip (deliveries, due dates) on the stored rows.
    later = DAY + pd.Timedelta(days=9)
    rolled = DailyStore(settings.path("feature_store"), store).refresh(later)
    assert not rolled.full
    assert_same_features(rolled.features, OfflineStore(settings.path("feature_store"), store).read(later))

    # A correction: an old order re-delivered with another amount, none of its times in the day. Only a
    # row-by-row comparison of the changed partitions finds it: its (merchant, day) alone is recomputed.
    fix = tmp_path / "correction"
    fix.mkdir()
    duckdb.connect().execute(f"""COPY (
        SELECT * REPLACE (amount * 3 + 1 AS amount) FROM '{days["base"]}/orders.parquet'
        WHERE ordered_at BETWEEN TIMESTAMP '{DAY - pd.Timedelta(days=60)}' AND TIMESTAMP '{DAY - pd.Timedelta(days=40)}'
        ORDER BY order_id LIMIT 1) TO '{fix / "orders.parquet"}' (FORMAT parquet)""")
    ingest(fix, settings)
    store = RawStore(settings.path("raw_store"))
    corrected = DailyStore(settings.path("feature_store"), store).refresh(later)
    assert corrected.days == {"orders": 1}
    assert_same_features(corrected.features, OfflineStore(settings.path("feature_store"), store).read(later))
    assert not corrected.features.equals(rolled.features)


def _the_monitor_takes_the_online_vector_for_the_features_now(store: RawStore, online: pd.DataFrame,
                                                              as_of: pd.Timestamp) -> None:
    """The early warning's book from the refresh's online vector equals the one from the point-in-time SQL;
    and it is the vector it reads (a changed feature there changes the book)."""
    from credit.policy import load_policy
    from pipelines.monitor import loan_book
    from testkit.service import POLICY, train_model

    model, policy = train_model(seed=7), load_policy(POLICY)
    book = loan_book(store, model, policy, as_of.to_pydatetime())
    assert len(book) > 0
    pd.testing.assert_frame_equal(loan_book(store, model, policy, as_of.to_pydatetime(), online), book)
    changed = online.assign(net_sales_30d=online["net_sales_30d"] + 1)
    moved = loan_book(store, model, policy, as_of.to_pydatetime(), changed)
    assert (moved["net_sales_30d"] == book["net_sales_30d"] + 1).all()


def test_online_features_roll_by_whole_days_only(settings):
    with pytest.raises(ScfriskError, match="must be a midnight"):
        DailyStore(settings.path("feature_store"), RawStore(settings.path("raw_store"))).refresh(
            DAY + pd.Timedelta(hours=6))


KEY = "refresh-test-key-0123456789"

def test_a_refresh_that_fails_or_finds_the_partials_open_leaves_the_last_state_whole(days, settings, monkeypatch):
    """The partials are one database and a refresh one transaction: a refresh that fails midway (here after
    the partials of every source were replaced, before a prefix sum) keeps the last state, and the next one
    rolls forward from it exactly; a second process holding the database is one clear line."""
    import subprocess
    import sys

    ingest(days["base"], settings)
    daily = DailyStore(settings.path("feature_store"), RawStore(settings.path("raw_store")))
    daily.refresh(DAY)
    ingest(days["day"], settings)
    store = RawStore(settings.path("raw_store"))
    state = DailyStore(settings.path("feature_store"), store).state()

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(DailyStore, "_prefix", crash)
        with pytest.raises(OSError, match="No space left"):
            DailyStore(settings.path("feature_store"), store).refresh(DAY + pd.Timedelta(days=1))
    assert DailyStore(settings.path("feature_store"), store).state() == state

    database = daily.dir / "daily.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(database)!r}); "
                               "print('open', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ScfriskError, match=r"^the daily features in .* cannot be opened \(is another refresh "
                                               r"running\?\): .*lock"):
            DailyStore(settings.path("feature_store"), store).refresh(DAY + pd.Timedelta(days=1))
    finally:
        holder.communicate("")
    after = DailyStore(settings.path("feature_store"), store).refresh(DAY + pd.Timedelta(days=1))
    assert not after.full and after.days["orders"] > 0
    assert_same_features(after.features, OfflineStore(settings.path("feature_store"), store).read(
        DAY + pd.Timedelta(days=1)))



@pytest.mark.slow
def test_scfrisk_refresh_publishes_the_day_and_the_running_service_switches_with_no_failed_request(
        days, tmp_path, prefect_server, monkeypatch):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.refresh import refresh_flow
    from serving.app import create_app
    from serving.auth import Keyring
    from serving.bundle import ALERTS_FILE, BUNDLES_DIR, read_manifest
    from testkit.service import register_champion, running_service

    settings = Settings(home=tmp_path / "home", service=ServiceConfig(reload_interval_seconds=0.05))
    version = register_champion(settings)
    first = refresh_flow(settings=settings, source=str(days["base"]))  # the first pull: the base, as of DAY
    assert first.as_of == DAY and first.model_version == version and "first build" in first.features
    merchant = pd.read_parquet(settings.path("feature_store") / "online" / "features.parquet")["merchant_id"].iloc[0]
    monkeypatch.setenv("SCFRISK_HOME", str(settings.home_dir))
    frozen = _publish_a_freeze(settings, merchant)  # what `scfrisk monitor` publishes on a late loan
    stop = threading.Event()

    with running_service(create_app(settings, Keyring.from_config([], {"SCFRISK_API_KEYS": KEY})), KEY) as client:
        assert client.get("/readyz").json()["bundle_id"] == frozen

        def hammer() -> list[tuple[int, str]]:
            answers = []
            with httpx.Client(base_url=str(client.base_url), headers={"X-API-Key": KEY}) as own:
                while not stop.is_set():
                    answer = own.post("/v1/score", json={"merchant_id": merchant})
                    answers.append((answer.status_code, answer.json().get("bundle_id")))
            return answers

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(hammer) for _ in range(3)]
            result = CliRunner().invoke(app, ["refresh", "--source", str(days["day"])])
            assert result.exit_code == 0, result.output
            published = settings.path("published")
            second = (published / "CURRENT").read_text().strip()
            deadline = time.monotonic() + 30
            while client.get("/readyz").json()["bundle_id"] != second and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # traffic on the new bundle too
            stop.set()
            answers = [a for f in futures for a in f.result()]
        scored = client.post("/v1/score", json={"merchant_id": merchant}).json()
    assert second != first.bundle_id and f"refreshed to {DAY + pd.Timedelta(days=1):%Y-%m-%d}" in result.output
    assert {code for code, _ in answers} == {200}
    assert {bundle for _, bundle in answers} == {frozen, second}  # served before and after the swap
    manifest = read_manifest(published / BUNDLES_DIR / second)
    assert manifest["features_as_of"] == (DAY + pd.Timedelta(days=1)).isoformat()
    assert manifest["model_version"] == version
    # The refresh checked the live loans as of its day: the freeze of a loan that does not exist is gone.
    assert manifest["alerts_as_of"] == (DAY + pd.Timedelta(days=1)).isoformat()
    assert "L-test" not in set(pd.read_parquet(published / BUNDLES_DIR / second / ALERTS_FILE)["loan_id"])
    assert scored["bundle_id"] == second


@pytest.mark.slow
def test_the_days_refresh_publishes_the_alerts_of_that_day(days, tmp_path):
    """The goods a live warehouse-receipt loan leans on all leave the warehouse during the day: the day's
    bundle carries the collateral alert (the monitor is a step of the refresh); the day before's did not."""
    from pipelines.monitor import live_loans
    from pipelines.refresh import refresh
    from serving.bundle import BUNDLES_DIR, read_manifest
    from testkit.service import register_champion

    settings = Settings(home=tmp_path / "home")
    register_champion(settings)
    before = refresh(settings, days["base"])
    assert before.as_of == DAY
    loans = live_loans(RawStore(settings.path("raw_store")), DAY.to_pydatetime())
    alerted = set(bundle_alerts(settings, before.bundle_id)[["loan_id", "signal"]].itertuples(index=False))
    loan = next(row for row in loans.itertuples() if row.product == "warehouse_receipt_financing"
                and row.warehouse_value_now > 0 and (row.loan_id, "collateral_released") not in alerted)

    day = tmp_path / "day"
    shutil.copytree(days["day"], day)
    con = duckdb.connect()
    released = DAY + pd.Timedelta(hours=12)
    con.execute(f"""COPY (
        SELECT * REPLACE (TIMESTAMP '{released}' AS released_at, TIMESTAMP '{released}' AS updated_at)
        FROM '{SAMPLE}/inventory_receipts/**/*.parquet'
        WHERE merchant_id = '{loan.merchant_id}' AND received_at < TIMESTAMP '{DAY}'
          AND coalesce(released_at >= TIMESTAMP '{DAY}', true)
        UNION ALL BY NAME
        SELECT * FROM '{days["day"]}/inventory_receipts.parquet' WHERE merchant_id <> '{loan.merchant_id}'
    ) TO '{day}/inventory_receipts.parquet' (FORMAT parquet)""")

    after = refresh(settings, day)
    manifest = read_manifest(settings.path("published") / BUNDLES_DIR / after.bundle_id)
    assert manifest["alerts_as_of"] == (DAY + pd.Timedelta(days=1)).isoformat()
    alerts = bundle_alerts(settings, after.bundle_id)
    fired = alerts[(alerts["loan_id"] == loan.loan_id) & (alerts["signal"] == "collateral_released")]
    assert len(fired) == 1 and fired["action"].iloc[0] == "call_collateral"
    assert "have been released" in fired["reason"].iloc[0]


def test_a_refresh_that_fails_after_its_features_writes_and_publishes_nothing(days, tmp_path, monkeypatch):
    """The monitor fails on the day: the live bundle stays, and neither the day's offline snapshot nor the
    online file is written (the snapshot step comes once every step before it has succeeded)."""
    import pipelines.monitor
    from features.online_store import ONLINE_FILE
    from pipelines.refresh import refresh
    from serving.bundle import current_bundle_id
    from testkit.service import register_champion

    settings = Settings(home=tmp_path / "home")
    register_champion(settings)
    before = refresh(settings, days["base"])
    offline = OfflineStore.from_settings(settings)
    online = offline.fs.cat_file(str(offline.location(*ONLINE_FILE.parts)))

    def down(*args, **kwargs):
        raise ScfriskError("the monitor is down")

    monkeypatch.setattr(pipelines.monitor, "watch", down)
    with pytest.raises(ScfriskError, match="the monitor is down"):
        refresh(settings, days["day"])
    assert not offline.fs.exists(str(offline.snapshot_path(DAY + pd.Timedelta(days=1))))
    assert offline.fs.cat_file(str(offline.location(*ONLINE_FILE.parts))) == online
    assert current_bundle_id(settings.path("published")) == before.bundle_id


def bundle_alerts(settings: Settings, bundle_id: str) -> pd.DataFrame:
    from serving.bundle import ALERTS_FILE, BUNDLES_DIR

    return pd.read_parquet(settings.path("published") / BUNDLES_DIR / bundle_id / ALERTS_FILE)


def _publish_a_freeze(settings: Settings, merchant: str) -> str:
    from pipelines.monitor import bundle_parts, live_bundle
    from pipelines.publish import publish

    alerts = pd.DataFrame({"as_of": [DAY], "loan_id": ["L-test"], "merchant_id": [merchant],
                           "product": ["microloan"], "signal": ["dpd"], "evidence": ["{}"], "action": ["freeze"],
                           "cut_share": [np.nan], "reason": ["a repayment is late"]})
    return publish(bundle_parts(live_bundle(settings), Path(settings.policy_file), alerts, DAY), settings)


def test_schedule_refresh_is_a_daily_deployment_with_this_workspace(tmp_path):
    from pipelines.refresh import daily_deployment

    settings = Settings(home=tmp_path / "ws")
    deployment = daily_deployment(settings, SAMPLE)
    assert deployment.flow_name == "scfrisk-refresh"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert Settings(**deployment.parameters["settings"]) == settings
    assert deployment.parameters["source"] == str(SAMPLE.resolve())
    with pytest.raises(ScfriskError, match="not a valid cron expression"):
        daily_deployment(settings, SAMPLE, cron="every day")


@pytest.mark.slow
def test_a_refresh_from_the_database_pulls_only_what_changed_since_the_last_pull(database, tmp_path):
    import pyarrow.compute as pc

    from core.postgres import load
    from pipelines.refresh import refresh
    from testkit.service import register_champion
    from tests.sample_slice import changed_at, sample_slice

    last = pd.Timestamp("2025-12-31").to_pydatetime()
    platform = sample_slice(20)
    base = {n: t.filter(pc.less(changed_at(t, n), last)) for n, t in platform.items()}
    day = {n: t.filter(pc.greater_equal(changed_at(t, n), last)) for n, t in platform.items()}
    load(database, {n: t.to_batches() for n, t in base.items()})
    settings = Settings(home=tmp_path / "home")
    register_champion(settings)
    first = refresh(settings, database)
    assert first.pulled["orders"] == base["orders"].num_rows
    load(database, {n: t.to_batches() for n, t in day.items()})
    second = refresh(settings, database)
    assert second.as_of == pd.Timestamp(last) + pd.Timedelta(days=1)
    # The day's rows and the last hour re-read before the watermark (`watermark_overlap_seconds`), not the history.
    assert day["orders"].num_rows <= second.pulled["orders"] < day["orders"].num_rows + 100
