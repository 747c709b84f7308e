"""The validation page of a rejected batch: what a data provider opens to fix the batch, readable offline."""

from __future__ import annotations

import html
import re
from datetime import datetime
from pathlib import Path

import pytest

from core.raw_store import RawStore
from core.rules import DataValidationError
from core.schemas import TABLES
from pipelines.ingest import reference_keys
from testkit.validation import validate_tables
from tests.batch_builder import to_arrow, valid_batch
from tests.browser import chromium, console_messages, needs_chromium

NOW = datetime(2024, 3, 1)


@pytest.fixture()
def rejected(settings, tmp_path: Path) -> tuple[Path, str]:
    """A batch whose order amounts are negative and one status unknown: the page and the error message."""
    good = {name: to_arrow(name, frame) for name, frame in valid_batch().items()}
    orders = valid_batch()["orders"]
    orders["amount"] = -orders["amount"]
    orders.loc[0, "status"] = "lost"
    with pytest.raises(DataValidationError) as err:
        validate_tables(
            {"orders": to_arrow("orders", orders)},
            TABLES,
            reference_keys(good, RawStore(tmp_path / "empty")),
            settings,
            NOW,
        )
    return settings.path("validation") / "index.html", str(err.value)


def test_the_page_lists_table_column_rule_failing_rows_and_examples(rejected: tuple[Path, str]) -> None:
    page, message = rejected
    assert f"(validation page: {page})" in message
    text = html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))
    assert "rejected: nothing was loaded" in text
    assert re.search(r"orders\s+amount\s+expect_column_values_to_be_between\(min_value=0", text)
    assert re.search(r"orders\s+status\s+expect_column_values_to_be_in_set", text)
    assert re.search(r"amount .*?\s6\s+6\s+-120\.0, -35\.5", text), "failing rows, of rows, examples"
    assert re.search(r"status .*?\s1\s+6\s+'lost'", text)
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page.read_text()), "nothing loaded from outside"


@needs_chromium
def test_the_page_shows_the_failure_in_chromium_with_the_network_off(
    rejected: tuple[Path, str], tmp_path: Path
) -> None:
    page, _ = rejected
    proc = chromium(page, tmp_path / "profile", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = re.sub(r"<[^>]+>", " ", proc.stdout)
    assert "Failed rules" in dom and "expect_column_values_to_be_between" in dom and "-120.0" in dom
    assert console_messages(proc) == []
    shot = tmp_path / "page.png"
    proc = chromium(page, tmp_path / "profile", "--window-size=1280,900", f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.stat().st_size > 20_000, "a blank page screenshots to a few KB"
