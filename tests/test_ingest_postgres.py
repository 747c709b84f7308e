"""Ingest from the platform's PostgreSQL database (a real throwaway server): the same snapshot as the same rows
from files, pulls that move by the day, the same validation, all or nothing, and a watermark that moves
only with a committed pull."""

from __future__ import annotations

import re
import sys
from datetime import datetime, timedelta

import adbc_driver_postgresql.dbapi
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.postgres import load
from core.raw_store import RawStore
from core.rules import DataValidationError
from core.schemas import TABLES
from core.settings import Settings
from pipelines.cli import run
from pipelines.ingest import ingest
from tests.conftest import SAMPLE
from tests.sample_slice import changed_at, latest_change, sample_slice, write_folder

MERCHANTS = 20
DAY = datetime(2025, 12, 31)
"""The sample's last day: the day the second pull brings."""


@pytest.fixture(scope="module")
def platform() -> dict[str, pa.Table]:
    if not (SAMPLE / "orders").is_dir():
        pytest.skip("data_samples/platform is not there")
    return sample_slice(MERCHANTS)


def batches(tables: dict[str, pa.Table]) -> dict[str, list[pa.RecordBatch]]:
    return {name: table.to_batches() for name, table in tables.items()}


def manifest(settings: Settings) -> dict:
    return RawStore(settings.path("raw_store")).manifest()


def contents(settings: Settings) -> dict[str, dict[str, str]]:
    """Each table's partitions and their content hashes: the data, whatever the Delta versions."""
    return {name: {key: part["sha256"] for key, part in table["partitions"].items()}
            for name, table in manifest(settings)["tables"].items()}


def watermarks(settings: Settings) -> dict[str, str]:
    return RawStore(settings.path("raw_store")).source_state()["postgresql"]["watermarks"]


def month(partition: str) -> str:
    return re.search(r"\d{4}-\d{2}", partition).group()


def test_a_pull_makes_the_same_snapshot_as_the_same_rows_from_parquet(database, platform, tmp_path):
    load(database, batches(platform))
    from_files = ingest(write_folder(tmp_path / "batch", platform), Settings(home=tmp_path / "files"))
    settings = Settings(home=tmp_path / "db")
    from_db = ingest(database, settings)
    assert from_db.snapshot_id == from_files.snapshot_id
    assert from_db.rows == from_files.rows == {name: table.num_rows for name, table in platform.items()}
    assert watermarks(settings) == {name: latest_change(table, name).isoformat() for name, table in platform.items()}
    again = ingest(database, settings)  # nothing new: the overlap's rows change nothing
    assert again.snapshot_id == from_db.snapshot_id


def test_a_second_pull_with_one_more_day_moves_only_that_day(database, platform, tmp_path):
    day = {name: table.filter(pc.greater_equal(changed_at(table, name), DAY)) for name, table in platform.items()}
    base = {name: table.filter(pc.less(changed_at(table, name), DAY)) for name, table in platform.items()}
    # A receivable issued months ago, unpaid in the base, is paid during the day: a changed older row.
    receivables = base["receivables"]
    unpaid = receivables.filter(pc.field("issued_at") < datetime(2025, 9, 1)).slice(0, 1).to_pylist()[0]
    paid = unpaid | {"paid_at": DAY + timedelta(hours=10), "updated_at": DAY + timedelta(hours=10)}
    unpaid |= {"paid_at": None, "updated_at": None}
    schema = TABLES["receivables"].arrow_schema
    others = receivables.filter(pc.field("receivable_id") != unpaid["receivable_id"])
    base["receivables"] = pa.concat_tables([others, pa.Table.from_pylist([unpaid], schema)])
    day["receivables"] = pa.concat_tables([day["receivables"], pa.Table.from_pylist([paid], schema)])
    final = {name: pa.concat_tables([base[name], day[name]]) for name in TABLES}
    final["receivables"] = pa.concat_tables([others, day["receivables"]])

    load(database, batches(base))
    settings = Settings(home=tmp_path / "home")
    ingest(database, settings)
    before, marks = contents(settings), watermarks(settings)
    load(database, batches(day))
    second = ingest(database, settings)

    # Read: the day's rows, and again the rows of the overlap before each watermark.
    overlap = timedelta(seconds=settings.ingest.watermark_overlap_seconds)
    for name, table in base.items():
        again = table.filter(pc.greater_equal(changed_at(table, name), datetime.fromisoformat(marks[name]) - overlap))
        assert second.rows[name] == day[name].num_rows + again.num_rows, name
    # Rewritten: only partitions of the day's month, and the paid receivable's own.
    after = contents(settings)
    rewritten = {(name, month(key)) for name, parts in after.items() for key, sha in parts.items()
                 if before.get(name, {}).get(key) != sha}
    assert {m for _, m in rewritten} == {"2025-12", unpaid["issued_at"].strftime("%Y-%m")}
    assert ("receivables", unpaid["issued_at"].strftime("%Y-%m")) in rewritten
    assert watermarks(settings) == {name: latest_change(table, name).isoformat() for name, table in final.items()}
    # The store now holds exactly what one ingest of the database's final rows from files gives.
    files = Settings(home=tmp_path / "files")
    ingest(write_folder(tmp_path / "final", final), files)
    assert contents(settings) == contents(files)


def execute(url: str, *statements: str) -> None:
    with adbc_driver_postgresql.dbapi.connect(url) as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
        connection.commit()


def test_a_bad_row_is_refused_naming_table_column_and_rule_and_the_watermark_stays(database, platform, tmp_path):
    load(database, batches(platform))
    settings = Settings(home=tmp_path / "home")
    ingest(database, settings)
    snapshot, marks = manifest(settings)["snapshot_id"], watermarks(settings)
    late = datetime.fromisoformat(marks["orders"]) + timedelta(hours=1)
    execute(database, f"UPDATE orders SET amount = -5, updated_at = TIMESTAMP '{late}' "
                      f"WHERE order_id = {platform['orders']['order_id'][0]}")
    rule = r"orders\.amount: expect_column_values_to_be_between\(min_value=0.*1 of .* rows"
    with pytest.raises(DataValidationError, match=rule):
        ingest(database, settings)
    assert manifest(settings)["snapshot_id"] == snapshot and watermarks(settings) == marks
    execute(database, f"UPDATE orders SET amount = 5 WHERE order_id = {platform['orders']['order_id'][0]}")
    ingest(database, settings)
    assert watermarks(settings)["orders"] == late.isoformat()


def test_a_wrong_password_or_host_is_one_line_from_the_cli(postgres, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PGPASSWORD", "")  # the CLI moves a URL's password there; restored after the test
    wrong = postgres.url().replace(postgres.password, "not-the-password")
    for url, reason in ((wrong, 'password authentication failed for user "scfrisk"'),
                        (postgres.url().replace("127.0.0.1", "no-such-host.invalid"), "could not translate host")):
        monkeypatch.setattr(sys, "argv", ["scfrisk", "ingest", "--source", url])
        with pytest.raises(SystemExit) as exit_:
            run()
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and reason in errors[0] and "Traceback" not in stderr, stderr
        assert postgres.password not in stderr and "not-the-password" not in stderr
        assert errors[0].startswith("error: cannot connect to PostgreSQL postgresql://scfrisk@")
    assert not (tmp_path / "home" / "raw").exists()


@pytest.mark.slow
def test_the_cli_pulls_from_the_configured_database_and_records_no_password(
    prefect_server, postgres, database, platform, tmp_path, monkeypatch, capsys
):
    from prefect.client.orchestration import get_client

    load(database, batches(platform))
    url = database.replace(f":{postgres.password}@", "@")
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PGPASSWORD", "")
    monkeypatch.setattr(sys, "argv", ["scfrisk", "ingest", "--source", database])  # the password in the URL
    run()
    assert f"from {url} into raw store" in capsys.readouterr().out
    config = tmp_path / "scfrisk.toml"
    config.write_text(f'[ingest]\nsource = "{url}"\n')
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    monkeypatch.setattr(sys, "argv", ["scfrisk", "-c", str(config), "ingest"])  # [ingest].source, PGPASSWORD
    run()
    assert f"from {url} into raw store" in capsys.readouterr().out
    assert watermarks(Settings(home=tmp_path / "home"))["orders"]
    with get_client(sync_client=True) as client:
        sources = [r.parameters["source"] for r in client.read_flow_runs() if "source" in r.parameters]
    assert url in sources and not [s for s in sources if postgres.password in s]
