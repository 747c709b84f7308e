"""The daily partials of the feature store, and the online vector rolled up from them (the I/O edge of
`features.daily`).

They live in one DuckDB database, `<feature_store>/version=<feature_set_version>/daily/daily.duckdb`:
    <source>_days     partials per merchant and day of facts (`features.daily.partials_sql`)
    <source>_months   the same added up per merchant and month (`months_sql`)
    <source>_prefix   the prefix sums per merchant, a column per offset and partial read (`prefix_sql`)
    state             the as_of and raw snapshot they hold, and the plan they were computed for
A refresh is one transaction: it deletes the partials it must recompute and inserts the new ones, then
rolls the month sums and prefix sums of what changed. A refresh that fails leaves the previous state, whole;
the cost of a day follows the (merchant, day) pairs it recomputes, not the months they fall in (measured:
the same day's partials as Parquet folders rewrote every touched month). `state.json` beside the database is
a copy of the state last committed, for readers that must not wait on the database's lock (retention).

What to recompute, from the state's (as_of, snapshot) to the new ones, for each source: the (merchant,
day) pairs of its facts with any time it reads (a refund, a delivery, a due date, the fact's own time) in
[old as_of, new as_of), whose point-in-time masks flip, and of the rows that differ in a column it reads
between the two snapshots in the raw partitions whose content changed (new rows, re-delivered rows whose
state changed, corrections). Everything else is as it was: a day's partials depend only on its rows and on
which of their times are before as_of.

The prefix sums are rolled forward, not recomputed: from the previous ones, the change of the recomputed
pairs' partials (new minus old, the unchanged left out) and the few days each window boundary moved past; a
first build, or a change reaching every day (a joined table), sums them anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.schemas import TABLES
from core.sql import fetch_one
from features.daily import (
    Plan,
    SourcePlan,
    delta_sql,
    edge_months,
    lookback,
    months_sql,
    partials_sql,
    plan,
    prefix_sql,
    rolled_sql,
)
from features.definitions import FEATURES, SOURCES, Feature, feature_set_version
from features.sql import assemble_sql, by_source, source_rows_sql, source_sql, used_columns
from features.training_set import KEYS, normalise_entities, table_readers

log = logging.getLogger(__name__)

DATABASE = "daily.duckdb"
STATE = "state.json"
LAYOUT = 5
T = TypeVar("T")


@dataclass
class DailyRefresh:
    """What one refresh did: the online vector, and which months of partials it recomputed."""

    features: pd.DataFrame
    as_of: pd.Timestamp
    recomputed: dict[str, list[str]] = field(default_factory=dict)
    """Months recomputed per source (all of them on a first build)."""
    full: bool = False
    """No usable earlier state: every month was computed."""
    days: dict[str, int] = field(default_factory=dict)
    """(merchant, day) pairs recomputed per source, when not whole months (a refresh of an earlier state)."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU seconds (this process, all threads) per phase: changes (the pairs to recompute), partials (their
    recomputation, and the commit of the whole), prefix (the prefix sums rolled forward), roll-up (the online
    vector)."""

    def describe(self) -> str:
        months = sum(len(m) for m in self.recomputed.values())
        pairs = sum(self.days.values())
        how = ("first build of the daily partials" if self.full else
               f"{pairs:,} (merchant, day) pair(s) of partials recomputed in {months} source-month(s)")
        return f"online features of {len(self.features):,} merchants as of {self.as_of:%Y-%m-%d}: {how}"


def _plan_hash(p: Plan) -> str:
    text = json.dumps([LAYOUT, [[s.source.name, s.partials] for s in p.sources]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


TOUCHED = "EXISTS (SELECT 1 FROM touched t WHERE t.merchant_id = o.merchant_id AND t.day = o.day)"
"""The partials row `o` is of a (merchant, day) pair the refresh recomputes (`DailyStore._touched`)."""


def _words(*sql: str) -> set[str]:
    return set(re.findall(r"\w+", " ".join(sql)))


def _sum_type(partial_type: str) -> str:
    """The type a prefix sum of a partial is kept in: the decimals' scale, integers as BIGINT."""
    match = re.fullmatch(r"DECIMAL\(\d+,(\d+)\)", partial_type.replace(" ", ""))
    if match:
        return f"DECIMAL(38,{match[1]})"
    return "BIGINT" if partial_type.endswith("INT") or partial_type == "INTEGER" else partial_type


def _months_sql(months: set[str], column: str) -> str:
    """A predicate keeping the times of the given months."""
    if not months:
        return "false"
    ranges = []
    for m in sorted(months):
        start = pd.Timestamp(f"{m}-01")
        end = start + pd.offsets.MonthBegin(1)
        ranges.append(f"({column} >= TIMESTAMP '{start:%Y-%m-%d}' AND {column} < TIMESTAMP '{end:%Y-%m-%d}')")
    return " OR ".join(ranges)


def _table(source_plan: SourcePlan, kind: str) -> str:
    """A table of the daily database: `days`, `months` or `prefix` of a source."""
    return f"daily.{source_plan.source.name}_{kind}"


def _rows(source_plan: SourcePlan, tables: dict[str, str], months: set[str] | None = None) -> dict[str, str]:
    """The source's rows (`features.sql.source_rows_sql`), as `partials_sql` reads them; given `months`, only
    those of the `touched` pairs, filtered before the facts' join and columns (a filter on the facts' time
    is not pushed down to the raw rows: 1.3-2.5x the CPU, measured)."""
    name, time = source_plan.source.name, source_plan.source.time_column
    rows = source_rows_sql(source_plan.source, source_plan.features, tables)
    if months is not None:
        rows = (f"(SELECT r.* FROM {rows} r SEMI JOIN touched t ON t.merchant_id = r.merchant_id "
                f"AND t.day = CAST(r.{time} AS DATE) WHERE {_months_sql(months, f'r.{time}')})")
    return {name: rows}


class DailyStore:
    """Daily partial aggregates of one raw store as of one midnight, for the current feature-set version."""

    def __init__(self, root: Path | str, raw_store: RawStore) -> None:
        self.dir = Path(root) / f"version={feature_set_version()}" / "daily"
        self.raw_store = raw_store
        self.plan = plan()

    def state(self) -> dict[str, Any] | None:
        """The state last committed (a copy: the database may be locked by a refresh)."""
        path = self.dir / STATE
        return json.loads(path.read_text()) if path.is_file() else None

    def _usable(self, state: dict[str, Any] | None, as_of: pd.Timestamp) -> RawStore | None:
        """The raw store as the state saw it, if the state can be rolled forward to as_of."""
        if state is None or state["plan"] != _plan_hash(self.plan) or pd.Timestamp(state["as_of"]) > as_of:
            return None
        try:
            return self.raw_store.at(state["raw_snapshot_id"])
        except ScfriskError:
            return None

    def _attach(self, con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
        """Open the database as `daily` in `con`; the state it holds."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            con.execute(f"ATTACH '{self.dir / DATABASE}' AS daily")
        except duckdb.IOException as e:
            raise ScfriskError(f"the daily features in {self.dir} cannot be opened (is another refresh running?): "
                               f"{str(e).splitlines()[0]}") from e
        con.execute("CREATE TABLE IF NOT EXISTS daily.state (state VARCHAR)")
        rows = con.execute("SELECT state FROM daily.state").fetchall()
        return json.loads(rows[0][0]) if rows else None

    def refresh(self, as_of: pd.Timestamp | str) -> DailyRefresh:
        """Bring the partials to as_of (a midnight) and the current raw snapshot; the online vector of
        every merchant onboarded before as_of, equal to the point-in-time SQL's."""
        as_of = pd.Timestamp(as_of)
        if as_of != as_of.normalize():
            raise ScfriskError(f"the online features roll by whole days: as_of must be a midnight, not {as_of}")
        store = self.raw_store.pinned()  # one snapshot throughout, its manifest read once
        with store.connect() as con:  # closed at the end: it holds the database's lock
            return self._refresh(con, store, as_of)

    def _refresh(self, con: duckdb.DuckDBPyConnection, store: RawStore, as_of: pd.Timestamp) -> DailyRefresh:
        cpu: dict[str, float] = {}

        def timed(phase: str, fn: Callable[..., T], *args: Any) -> T:
            start = time.process_time()
            try:
                return fn(*args)
            finally:
                cpu[phase] = cpu.get(phase, 0.0) + time.process_time() - start

        tables = table_readers(store, con)
        stored = self._attach(con)
        before = self._usable(stored, as_of)
        old = stored if before is not None else None
        changed = store.changed_partitions(before) if before else {}
        # Every merchant's partials (one onboarded later may have facts before); read once (hundreds of files).
        con.execute(f"CREATE OR REPLACE TEMP TABLE merchant_list AS SELECT merchant_id, onboarded_at "
                    f"FROM {tables['merchants']}")
        con.execute("CREATE OR REPLACE TEMP TABLE entities AS SELECT row_number() OVER () AS eid, merchant_id, "
                    "?::TIMESTAMP AS as_of FROM merchant_list", [as_of.to_pydatetime()])
        recomputed: dict[str, list[str]] = {}
        days: dict[str, int] = {}
        new_state = {"as_of": as_of.isoformat(), "raw_snapshot_id": store.snapshot_id, "plan": _plan_hash(self.plan)}
        con.execute("BEGIN TRANSACTION")
        try:
            if old is None:
                self._clear(con)
            for source_plan in self.plan.sources:
                name = source_plan.source.name
                months = None if old is None else timed("changes", self._touched, con, (store, before), source_plan,
                                                         changed, pd.Timestamp(old["as_of"]), as_of)
                delta = None
                if months is None:
                    recomputed[name] = timed("partials", self._build, con, source_plan, tables)
                elif months:
                    timed("partials", self._update, con, source_plan, tables, months)
                    recomputed[name] = sorted(months)
                    (days[name],) = fetch_one(con, "SELECT count(*) FROM touched")
                    delta = delta_sql(source_plan, "touched_partials", "replaced_partials")
                if source_plan.prefixed:
                    timed("prefix", self._prefix, con, source_plan, old if months is not None else None, delta,
                          as_of)
            con.execute("DELETE FROM daily.state")
            con.execute("INSERT INTO daily.state VALUES (?)", [json.dumps(new_state)])
            timed("partials", con.execute, "COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.TransactionException):  # a COMMIT that failed has rolled back
                con.execute("ROLLBACK")
            raise
        tmp = self.dir / f"{STATE}.tmp"
        tmp.write_text(json.dumps(new_state, indent=1, sort_keys=True))
        tmp.replace(self.dir / STATE)
        frame = timed("roll-up", self._roll_up, con, tables, as_of)
        return DailyRefresh(frame, as_of, recomputed, full=old is None, cpu_seconds=cpu, days=days)

    def _clear(self, con: duckdb.DuckDBPyConnection) -> None:
        """Before a first build: no table of another plan is left, nor the folders of the Parquet layout the
        partials had before this database."""
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'daily' "
                                    "AND table_name <> 'state'").fetchall():
            con.execute(f'DROP TABLE daily."{table}"')
        for folder in self.dir.glob("*/gen=*"):
            shutil.rmtree(folder, ignore_errors=True)

    def _touched(self, con: duckdb.DuckDBPyConnection, stores: tuple[RawStore, RawStore], source_plan: SourcePlan,
                 changed: dict[str, set[tuple[str, int]]], old_as_of: pd.Timestamp,
                 as_of: pd.Timestamp) -> set[str] | None:
        """The (merchant, day) pairs whose partials may differ, into the temp table `touched`; their months,
        or None: every day may. Only the raw columns the partials read count: a joined table whose columns
        they do not use, a time they do not compare. `stores`: the raw store now and as the state saw it."""
        source = source_plan.source
        spec = TABLES[source.table]
        read = _words(source.time_column, *(expr for _, expr in used_columns(source, source_plan.features)))
        joined = set(re.findall(r"\{(\w+)\}", source.relation)) - {"table", source.table}
        if any(changed.get(t) and read & (set(TABLES[t].column_index) - set(spec.column_index)) for t in joined):
            return None  # a joined table whose columns the partials use changed: its rows reach any day
        time = source.time_column
        pair = f"SELECT merchant_id, CAST({time} AS DATE) AS day FROM"
        # One scan per time, of the files whose time ranges (the manifest's) say they may hold a time of that
        # column in the range (most hold none), each a plain range for DuckDB to prune the rest by.
        now = stores[0]
        pairs = [f"{pair} {now.register(con, source.table, view=f'{source.table}__{c}', during=(c, old_as_of, as_of))}"
                 f" WHERE {c} >= $old AND {c} < $new AND {time} < $new" for c in spec.timestamp_columns if c in read]
        moved = changed.get(source.table, set())
        if moved:  # the rows of the changed partitions that differ in a column read, before or after
            rows = now.changed_rows(con, stores[1], source.table, moved, read & set(spec.column_index), time)
            pairs.append(f"{pair} ({rows}) WHERE {time} IS NOT NULL")
        params = {"old": old_as_of.to_pydatetime(), "new": as_of.to_pydatetime()}
        con.execute(f"CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT * FROM ({' UNION ALL '.join(pairs)})",
                    params)
        return {m for (m,) in con.execute("SELECT DISTINCT strftime(day, '%Y-%m') FROM touched").fetchall()}

    def _build(self, con: duckdb.DuckDBPyConnection, source_plan: SourcePlan, tables: dict[str, str]) -> list[str]:
        """Every day's partials of the source, and their month sums, anew; the months they hold."""
        days, months = _table(source_plan, "days"), _table(source_plan, "months")
        con.execute(f"CREATE OR REPLACE TABLE {days} AS "
                    f"SELECT * FROM ({partials_sql(source_plan, _rows(source_plan, tables))}) ORDER BY day")
        if source_plan.month_columns:
            con.execute(f"CREATE OR REPLACE TABLE {months} AS SELECT * FROM ({months_sql(source_plan, days)}) "
                        "ORDER BY day")
        held = con.execute(f"SELECT DISTINCT strftime(day, '%Y-%m') FROM {days} ORDER BY 1").fetchall()
        return [m for (m,) in held]

    def _update(self, con: duckdb.DuckDBPyConnection, source_plan: SourcePlan, tables: dict[str, str],
                months: set[str]) -> None:
        """Replace the partials of the `touched` pairs (in `months`) and the month sums of their merchants'
        months. What they replace is kept in the temp table `replaced_partials`, the new ones in
        `touched_partials`, for the prefix sums' change."""
        days, sums = _table(source_plan, "days"), _table(source_plan, "months")
        con.execute("CREATE OR REPLACE TEMP TABLE touched_partials AS "
                    + partials_sql(source_plan, _rows(source_plan, tables, months)))
        # The days' first touched one, a constant DuckDB skips whole row groups by (the table is in day order).
        (first,) = fetch_one(con, "SELECT min(day) FROM touched")
        since = f"o.day >= DATE '{first:%Y-%m-%d}'"
        con.execute(f"CREATE OR REPLACE TEMP TABLE replaced_partials AS SELECT * FROM {days} o "
                    f"WHERE {since} AND {TOUCHED}")
        con.execute(f"DELETE FROM {days} o WHERE {since} AND {TOUCHED}")
        con.execute(f"INSERT INTO {days} BY NAME SELECT * FROM touched_partials")
        if not source_plan.month_columns:
            return
        con.execute("CREATE OR REPLACE TEMP TABLE touched_months AS SELECT DISTINCT merchant_id, "
                    "CAST(date_trunc('month', day) AS DATE) AS day FROM touched")
        con.execute(f"DELETE FROM {sums} o USING touched_months t "
                    "WHERE t.merchant_id = o.merchant_id AND t.day = o.day")
        # A semi-join: the same as EXISTS, which DuckDB plans 8x slower on a computed key (measured).
        month_days = (f"(SELECT d.* FROM {days} d SEMI JOIN touched_months t ON t.merchant_id = d.merchant_id "
                      f"AND t.day = CAST(date_trunc('month', d.day) AS DATE) WHERE d.day >= DATE '{first:%Y-%m-01}')")
        con.execute(f"INSERT INTO {sums} BY NAME {months_sql(source_plan, month_days)}")

    def _prefix(self, con: duckdb.DuckDBPyConnection, source_plan: SourcePlan, old: dict[str, Any] | None,
                delta: str | None, as_of: pd.Timestamp) -> None:
        """The source's prefix sums as of as_of (`features.daily.prefix_sql`): rolled forward from the old
        state's with the change `delta` (`delta_sql`) of the recomputed days; anew without an old state."""
        days, sums = _table(source_plan, "days"), _table(source_plan, "prefix")
        types = {c: _sum_type(t) for c, t, *_ in con.execute(f"DESCRIBE SELECT * FROM {days}").fetchall()}
        if old is None:
            con.execute(f"CREATE OR REPLACE TABLE {sums} AS {prefix_sql(source_plan, as_of, days, types)}")
            return
        con.execute("CREATE OR REPLACE TEMP TABLE rolled_prefix AS "
                    + prefix_sql(source_plan, as_of, days, types, sums, pd.Timestamp(old["as_of"]), delta))
        con.execute(f"DELETE FROM {sums}")
        con.execute(f"INSERT INTO {sums} BY NAME SELECT * FROM rolled_prefix")

    def _partials(self, source_plan: SourcePlan, as_of: pd.Timestamp, features: list[Feature], mixed: bool) -> str:
        """The partials these features read as of as_of (`features.daily.rolled_sql`): the days they reach
        back to, or (mixed) the days of their edge months and the other months whole."""
        days_back = lookback(features)
        first = None if days_back is None else as_of - pd.Timedelta(days=days_back)
        table = _table(source_plan, "days")
        if not mixed:
            since = "" if first is None else f" WHERE day >= DATE '{first:%Y-%m-%d}'"
            return f"(SELECT * FROM {table}{since})"
        # Month rows are dated their month's first day: the edge month's days too, from that day.
        reach = "" if first is None else f" WHERE day >= DATE '{first:%Y-%m-01}'"
        days = f"(SELECT * FROM {table}{reach})"
        edges = _months_sql(edge_months(features, as_of), "day")
        return (f"(SELECT *, false AS is_month FROM {days} WHERE {edges} UNION ALL BY NAME "
                f"SELECT *, true AS is_month FROM {_table(source_plan, 'months')}{reach})")

    def _roll_up(self, con: duckdb.DuckDBPyConnection, tables: dict[str, str], as_of: pd.Timestamp) -> pd.DataFrame:
        """The vector of every merchant onboarded before as_of (from `merchant_list`)."""
        merchants = con.execute(
            "SELECT merchant_id, ?::TIMESTAMP AS as_of FROM merchant_list WHERE onboarded_at < ?::TIMESTAMP "
            "ORDER BY merchant_id", [as_of.to_pydatetime()] * 2).df()
        entities = normalise_entities(merchants)
        con.register("batch", entities)
        con.execute("CREATE OR REPLACE TEMP TABLE entities AS SELECT row_number() OVER () AS eid, * FROM batch")
        relations = {}
        for source_plan in self.plan.sources:
            relation = partial(self._partials, source_plan, as_of)
            sums = _table(source_plan, "prefix") if source_plan.prefixed else None
            relations[f"r_{source_plan.source.name}"] = (rolled_sql(source_plan, relation, sums), source_plan.features)
        direct = by_source(self.plan.direct)
        rows = {name: source_rows_sql(SOURCES[name], fs, tables) for name, fs in direct.items()}
        for name, fs in direct.items():
            relations[f"d_{name}"] = (source_sql(SOURCES[name], fs, rows), fs)
        features = con.execute(assemble_sql(relations, FEATURES)).df()
        return entities.merge(features, on=KEYS, how="left", validate="one_to_one")
