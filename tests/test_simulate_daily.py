"""The simulator day by day: a base as of a first day, then one ingestible batch a day, which upserted in
order give back the whole history; nothing of the future in the base or in a day."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.schemas import TABLES
from core.settings import Settings
from pipelines.ingest import ingest
from simulator import SimulationConfig, simulate_platform

TINY = SimulationConfig(n_merchants=200, months=5, seed=5, chunk_size=80)
"""Three chunks, so the daily parts of several chunks are checked together."""
DAYS = 6
FIRST_DAY = np.datetime64("2024-05-26")
"""The window ends 2024-06-01: the base is as of 2024-05-26 00:00, then 2024-05-26 .. 2024-05-31."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the whole history, the same platform day by day)."""
    root = tmp_path_factory.mktemp("daily")
    simulate_platform(TINY, root / "full")
    simulate_platform(TINY, root / "daily", days=DAYS)
    return root / "full", root / "daily"


def _days(daily: Path) -> list[Path]:
    return sorted((daily / "daily").iterdir())


def _read(folder: Path, name: str) -> pa.Table:
    """The table's rows in the folder; none when a day left it out (nothing new in it that day)."""
    spec = TABLES[name]
    return pq.read_table(folder / name) if (folder / name).is_dir() else spec.arrow_schema.empty_table()


def _upsert(stored: pa.Table, batch: pa.Table, key: str) -> pa.Table:
    kept = stored.filter(pc.invert(pc.is_in(stored[key], value_set=batch[key])))
    return pa.concat_tables([kept, batch])


def _us(day: np.datetime64) -> pa.Scalar:
    return pa.scalar(day.astype("datetime64[us]"), pa.timestamp("us"))


def test_the_layout_is_a_base_one_folder_a_day_and_the_oracle(runs: tuple[Path, Path]) -> None:
    _, daily = runs
    assert sorted(p.name for p in daily.iterdir()) == ["base", "daily", "oracle"]
    names = [str(FIRST_DAY + i) for i in range(DAYS)]
    assert [p.name for p in _days(daily)] == names
    assert sorted(p.name for p in (daily / "base").iterdir()) == sorted(TABLES)  # loans from April on
    for folder in [daily / "base", *_days(daily)]:
        assert {p.name for p in folder.iterdir()} >= {"orders", "behaviour_events"}
        for name, spec in TABLES.items():
            for part in (folder / name).glob("part-*.parquet"):
                assert pq.read_schema(part).equals(spec.arrow_schema), part
    assert (_days(daily)[-1] / "loan_performance").is_dir(), "month-end repayment rows come on the last day"


def test_base_plus_the_days_upserted_in_order_is_the_whole_history(runs: tuple[Path, Path]) -> None:
    full, daily = runs
    changed_rows = 0
    for name, spec in TABLES.items():
        table = _read(daily / "base", name)
        for day in _days(daily):
            batch = _read(day, name)
            changed_rows += pc.sum(pc.is_in(batch[spec.key], value_set=table[spec.key])).as_py() or 0
            table = _upsert(table, batch, spec.key)
        expected = _read(full, name).sort_by(spec.key)
        assert table.sort_by(spec.key).equals(expected), name
    assert changed_rows > 100, "the days carry state changes of older rows, not only new rows"


def test_the_base_knows_nothing_after_its_day(runs: tuple[Path, Path]) -> None:
    full, daily = runs
    cut = _us(FIRST_DAY)
    for name, spec in TABLES.items():
        base, whole = _read(daily / "base", name), _read(full, name)
        for column in spec.timestamp_columns:
            if not spec.column_index[column].scheduled:
                assert pc.sum(pc.greater_equal(base[column], cut)).as_py() in (None, 0), f"{name}.{column}"
        assert base.num_rows == pc.sum(pc.less(whole[spec.time_column], cut)).as_py(), name
    # Orders placed before the day and delivered after it: in the base as they were, not yet delivered.
    orders = _read(daily / "base", "orders")
    later = _read(full, "orders").filter((pc.field("ordered_at") < cut) & (pc.field("delivered_at") >= cut))
    assert later.num_rows > 50
    before = orders.filter(pc.is_in(orders["order_id"], value_set=later["order_id"]))
    assert before.num_rows == later.num_rows
    assert set(before["status"].to_pylist()) == {"paid", "shipped"}
    assert before["delivered_at"].null_count == before.num_rows
    assert "delivered" in set(later["status"].to_pylist())
    for table, column in (("receivables", "paid_at"), ("inventory_receipts", "released_at")):
        base = _read(daily / "base", table)
        assert pc.sum(pc.is_null(base[column])).as_py() > 0, f"{table}: unpaid or unreleased rows as of the day"


def test_each_day_holds_the_rows_written_or_changed_that_day(runs: tuple[Path, Path]) -> None:
    _, daily = runs
    for i, day in enumerate(_days(daily)):
        start, stop = _us(FIRST_DAY + i), _us(FIRST_DAY + i + 1)
        for name, spec in TABLES.items():
            changed = _read(day, name)[spec.change_column]
            assert pc.all(pc.and_(pc.greater_equal(changed, start), pc.less(changed, stop))).as_py() in (None, True)
        assert _read(day, "orders").num_rows > 0, day.name


def test_same_seed_same_days(runs: tuple[Path, Path], tmp_path: Path) -> None:
    _, daily = runs
    simulate_platform(TINY, tmp_path / "again", days=DAYS)
    files = sorted(p.relative_to(daily) for p in daily.rglob("*.parquet"))
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.parquet"))
    assert all((daily / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)


def test_a_shorter_run_in_the_same_folder_leaves_no_stale_day(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    simulate_platform(TINY, out, days=DAYS)
    simulate_platform(TINY, out, days=2)
    assert [p.name for p in _days(out)] == [str(FIRST_DAY + DAYS - 2), str(FIRST_DAY + DAYS - 1)]


@pytest.mark.parametrize("days", [-1, 152])
def test_days_outside_the_window_are_refused(days: int, tmp_path: Path) -> None:
    with pytest.raises(ScfriskError, match="days must be between 1 and 151"):
        simulate_platform(TINY, tmp_path / "out", days=days)


@pytest.mark.slow
def test_every_day_is_an_ingestible_batch_and_the_store_ends_as_the_whole_history(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Ingested base then day by day (two days: a batch costs seconds of Great Expectations), validated by
    the same rules, the raw store holds the very partitions (same content hashes) that ingesting the whole
    history at once gives."""
    full, _ = runs
    daily = tmp_path / "two_days"
    simulate_platform(TINY, daily, days=2)
    now = datetime(2024, 6, 1)
    by_day = Settings(home=tmp_path / "by_day")
    for folder in [daily / "base", *_days(daily)]:
        result = ingest(folder, by_day, now)
        assert result.rules_checked > 0 and not result.already_loaded, folder
    written = result.partitions_written["orders"]  # the day's new orders and the changes of May's: May only
    assert written and all("2024-05" in partition for partition in written), written
    at_once = Settings(home=tmp_path / "at_once")
    ingest(full, at_once, now)

    def partitions(settings: Settings) -> dict[str, object]:
        """Each partition's content: its entry less the version it was last rewritten over (`changed_from`)."""
        tables = RawStore(settings.path("raw_store")).manifest()["tables"]
        return {name: {key: {k: v for k, v in part.items() if k != "changed_from"}
                       for key, part in t["partitions"].items()} for name, t in tables.items()}

    assert partitions(by_day) == partitions(at_once)
    rewritten = RawStore(by_day.path("raw_store")).manifest()["tables"]["orders"]["partitions"]
    assert all("changed_from" in rewritten[p] for p in written)  # the day's change files say what changed
