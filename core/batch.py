"""A batch folder of platform tables, and whether a stage has the raw tables it needs.

Cheap checks (file names, no data read) that the CLI runs before it imports Prefect or Great Expectations
or starts any work, so a batch or a workspace that cannot serve a stage is refused at once, with the
reason, instead of failing minutes later with a misleading one.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ScfriskError
from core.schemas import STAGE_TABLES, TABLES

if TYPE_CHECKING:
    from core.raw_store import RawStore

IGNORED = {"oracle"}
"""Folders a batch may carry that are not data to load (the simulator's ground truth)."""


class BatchError(ScfriskError):
    """A batch folder that cannot be read as platform tables."""


class MissingTablesError(ScfriskError):
    """A stage asked of a workspace (and batch) that lacks raw tables the stage needs."""


def locate_tables(source: Path) -> dict[str, Path]:
    """Map each table of the batch to its file or folder, in dependency order; unknown names are errors."""
    if not source.is_dir():
        raise BatchError(f"batch folder {source} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or path.name in IGNORED:
            continue
        name = path.name if path.is_dir() else path.stem
        if name not in TABLES or not (path.is_dir() or path.suffix in (".parquet", ".csv")):
            raise BatchError(
                f"unknown table file '{path.name}' in {source}; expected <table>.parquet, <table>.csv or "
                f"<table>/ for tables: {', '.join(TABLES)}"
            )
        if name in found:
            raise BatchError(f"table '{name}' is given twice in {source}: {found[name].name} and {path.name}")
        found[name] = path
    if not found:
        raise BatchError(f"no table files in {source}; expected any of: {', '.join(TABLES)}")
    return {name: found[name] for name in TABLES if name in found}


def missing_tables(stage: str, store: RawStore, batch: Collection[str] = ()) -> list[str]:
    """The tables `stage` needs that neither the raw store nor the batch about to be ingested holds."""
    return [name for name in STAGE_TABLES[stage] if name not in batch and not store.has_table(name)]


def require_tables(
    stage: str, store: RawStore, batch: Collection[str] | None = None, batch_description: str = ""
) -> None:
    """Refuse a stage whose raw tables are missing, naming them and where they were looked for (the raw
    store, and the tables of the batch about to be ingested, described for the message)."""
    missing = missing_tables(stage, store, batch or ())
    if not missing:
        return
    needs, lacking = ", ".join(STAGE_TABLES[stage]), ", ".join(missing)
    if batch is not None:
        raise MissingTablesError(f"{stage} needs raw tables {needs}; neither batch {batch_description} nor "
                                 f"raw store {store.root} has {lacking}")
    raise MissingTablesError(f"{stage} needs raw tables {needs}; raw store {store.root} has no {lacking}: "
                             f"ingest a batch with {'it' if len(missing) == 1 else 'them'} first")
