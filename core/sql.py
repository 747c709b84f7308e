"""DuckDB connections held to the budget of the process that opens them.

DuckDB's own defaults are 80% of the machine's memory and every core, per connection, and spill files in
`.tmp` under the working directory. On a Dask worker that takes the worker past the memory limit Dask kills
it at, and two workers fight for every core. Every connection of scfrisk is opened here, so that a query
spills to disk instead of growing without bound.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from core.errors import ScfriskError

if TYPE_CHECKING:
    import duckdb

    from core.settings import Settings

SHARE = 0.5
"""The part of its process's memory a connection may take: the rest is the caller's own Arrow and pandas
data, and Dask's."""


def duckdb_connect(settings: Settings | None = None) -> duckdb.DuckDBPyConnection:
    """A connection with a memory limit, threads and a spill folder fit for where it runs.

    - On a Dask worker: `SHARE` of the worker's memory limit, the worker's threads, spill in the worker's
      own scratch folder (what the worker knows wins over the settings: it is what Dask enforces).
    - Elsewhere, with `settings`: `SHARE` of `[compute] memory_limit`, the machine's cores, spill under
      `SCFRISK_HOME` (so that all state stays there).
    - Elsewhere, without settings: DuckDB's defaults. A command has settings and passes them (a raw store's
      readers through `RawStore.connect`), so that its spill files stay under `SCFRISK_HOME`.

    The budget is kept as this process's `Budget`, for the one line an out-of-memory error becomes
    (`out_of_memory`)."""
    import duckdb

    global _budget
    limit, threads, scratch = _worker_budget()
    source = "worker"
    if limit is None and settings is not None:
        limit, scratch = size_bytes(settings.compute.memory_limit), settings.home / "tmp" / "duckdb"
        scratch.parent.mkdir(parents=True, exist_ok=True)  # DuckDB makes the last folder only, when it spills
        source = settings.compute.memory_limit
    config: dict[str, str | int] = {}
    if limit is not None:
        config |= {"memory_limit": f"{int(limit * SHARE)}B", "threads": threads or os.cpu_count() or 1}
    if scratch is not None:
        config["temp_directory"] = str(scratch)
    _budget = Budget(limit, source) if limit is not None else None
    return duckdb.connect(config=config)  # type: ignore[arg-type]


class Budget(NamedTuple):
    """The memory a process's connections were given: `limit` bytes (they take `SHARE` of it), from a Dask
    worker's memory limit (`source` "worker") or `[compute] memory_limit` (`source` its value)."""

    limit: int
    source: str


_budget: Budget | None = None
"""The budget of the last connection this process opened (None: DuckDB's defaults). One per process: a Dask
worker's connections all get the worker's, a flow process's all get the settings'."""


class OutOfMemoryError(ScfriskError):
    """DuckDB ran out of its memory budget: the one line says which budget, where it came from, what to do."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is DuckDB's out-of-memory error (without importing DuckDB where it was never used)."""
    module = sys.modules.get("duckdb")
    return module is not None and isinstance(exc, module.OutOfMemoryException)


def out_of_memory(where: str | None = None) -> OutOfMemoryError:
    """The error a `duckdb.OutOfMemoryException` raised in this process (in `where`: a stage, a table) becomes:
    the budget DuckDB had, where it came from and what to change, in one line instead of a traceback."""
    at = f" in {where}" if where else ""
    more = "or spread the work over more partitions (a new raw store's [compute] merchant_buckets) or Dask workers"
    if _budget is None:
        return OutOfMemoryError(
            f"DuckDB ran out of memory{at} with its default budget (80% of this machine's memory); free memory, "
            f"or set [compute] memory_limit (SCFRISK_COMPUTE__MEMORY_LIMIT) and {more}")
    budget = f"{_budget.limit * SHARE / 2**20:,.1f} MiB"
    if _budget.source == "worker":
        return OutOfMemoryError(
            f"DuckDB ran out of memory{at} on a Dask worker: its budget was {budget}, {SHARE:.0%} of the worker's "
            f"memory limit ({_budget.limit / 2**20:,.0f} MiB: [compute] memory_limit or SCFRISK_COMPUTE__MEMORY_LIMIT "
            f"for the cluster a flow starts, the workers' own --memory-limit at a [compute] address); raise it, {more}")
    return OutOfMemoryError(
        f"DuckDB ran out of memory{at}: its budget was {budget}, {SHARE:.0%} of [compute] memory_limit = "
        f"{_budget.source} (SCFRISK_COMPUTE__MEMORY_LIMIT); raise it, {more}")



def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> tuple[Any, ...]:
    """The one row of a query (an aggregate), its result read to the end: `fetchone()` leaves it unfinished,
    and DuckDB 2 then refuses other work on the connection (a `register`: "unfinished result")."""
    (row,) = con.execute(sql, params).fetchall()
    return row


def _worker_budget() -> tuple[int | None, int | None, Path | None]:
    """(memory limit in bytes, threads, scratch folder) of the Dask worker running this code; Nones
    elsewhere."""
    if "distributed" not in sys.modules:
        return None, None, None
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None, None, None
    return worker.memory_manager.memory_limit, worker.state.nthreads, Path(worker.local_directory) / "duckdb"


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(size: str) -> int:
    """Bytes of a size as `[compute] memory_limit` takes it (`4GiB`, `512MB`)."""
    number, unit = re.fullmatch(r"([\d.]+)\s*([A-Za-z]*)", size.strip()).groups()  # type: ignore[union-attr]
    return int(float(number) * _UNITS[unit.lower()])
