"""The daily partials of the feature store, and the online vector rolled up from them (the I/O edge of
`features.daily`).

Layout under `<feature_store>/version=<feature_set_version>/daily/`:
    <source>/gen=<id>/month=<YYYY-MM>/*.parquet         partials per merchant and day of one month of facts
    <source>/gen=<id>/whole/month=<YYYY-MM>/*.parquet   the same added up per merchant and month
    <source>/gen=<id>/prefix.parquet                     the prefix sums per merchant and offset (`prefix_sql`)
    state.json   the as_of and raw snapshot they hold, and the folder of every (source, month)
A refresh rewrites only the months it must, into a new generation, then replaces `state.json` (temp file
and rename): a refresh that fails leaves the previous state and its files; files no state names any more
are removed after the switch.

What to recompute, from the state's (as_of, snapshot) to the new ones, for each source: the (merchant,
day) pairs of its facts with any time it reads (a refund, a delivery, a due date, the fact's own time) in
[old as_of, new as_of), whose point-in-time masks flip, and of the rows that differ in a column it reads
between the two snapshots in the raw partitions whose content changed (new rows, re-delivered rows whose
state changed, corrections). Everything else is as it was: a day's partials depend only on its rows and on
which of their times are before as_of. Only those pairs' partials are computed from the raw store; the
other days of their months are copied from the previous generation.

The prefix sums are rolled forward, not recomputed: from the previous ones, the change of the recomputed
pairs' partials (new minus old, the unchanged left out) and the few days each window boundary moved past; a
first build, or a change reaching every day (a joined table), sums them anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import uuid
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
    crossed_days,
    delta_sql,
    edge_months,
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

STATE = "state.json"
WHOLE = "whole"
"""Folder of a generation holding its months' partials added up per merchant and month."""
LAYOUT = 3
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
    """CPU seconds (this process, all threads) per phase: changes (the months to recompute), partials (their
    recomputation), prefix (the prefix sums rolled forward), roll-up (the online vector)."""

    def describe(self) -> str:
        months = sum(len(m) for m in self.recomputed.values())
        pairs = sum(self.days.values())
        how = ("first build of the daily partials" if self.full else
               f"{pairs:,} (merchant, day) pair(s) of partials recomputed in {months} source-month(s)")
        return f"online features of {len(self.features):,} merchants as of {self.as_of:%Y-%m-%d}: {how}"


def _plan_hash(p: Plan) -> str:
    text = json.dumps([LAYOUT, [[s.source.name, s.partials] for s in p.sources]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _touched_sql(row: str = "o", day: str = "o.day") -> str:
    """The row is of a (merchant, day) pair the refresh recomputes (`DailyStore._touched`)."""
    return f"EXISTS (SELECT 1 FROM touched t WHERE t.merchant_id = {row}.merchant_id AND t.day = {day})"


def _words(*sql: str) -> set[str]:
    return set(re.findall(r"\w+", " ".join(sql)))


def _sum_type(partial_type: str) -> str:
    """The type a prefix sum of a partial is kept in: the decimals' scale, integers as BIGINT."""
    match = re.fullmatch(r"DECIMAL\(\d+,(\d+)\)", partial_type.replace(" ", ""))
    if match:
        return f"DECIMAL(38,{match[1]})"
    return "BIGINT" if partial_type.endswith("INT") or partial_type == "INTEGER" else partial_type


def _months_sql(months: set[str], column: str = "fact_time") -> str:
    """A predicate keeping the times of the given months."""
    if not months:
        return "false"
    ranges = []
    for m in sorted(months):
        start = pd.Timestamp(f"{m}-01")
        end = start + pd.offsets.MonthBegin(1)
        ranges.append(f"({column} >= TIMESTAMP '{start:%Y-%m-%d}' AND {column} < TIMESTAMP '{end:%Y-%m-%d}')")
    return " OR ".join(ranges)


class DailyStore:
    """Daily partial aggregates of one raw store as of one midnight, for the current feature-set version."""

    def __init__(self, root: Path | str, raw_store: RawStore) -> None:
        self.dir = Path(root) / f"version={feature_set_version()}" / "daily"
        self.raw_store = raw_store
        self.plan = plan()

    def state(self) -> dict[str, Any] | None:
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

    def refresh(self, as_of: pd.Timestamp | str) -> DailyRefresh:
        """Bring the partials to as_of (a midnight) and the current raw snapshot; the online vector of
        every merchant onboarded before as_of, equal to the point-in-time SQL's."""
        as_of = pd.Timestamp(as_of)
        if as_of != as_of.normalize():
            raise ScfriskError(f"the online features roll by whole days: as_of must be a midnight, not {as_of}")
        before = self._usable(self.state(), as_of)
        old = self.state() if before is not None else None
        cpu: dict[str, float] = {}

        def timed(phase: str, fn: Callable[..., T], *args: Any) -> T:
            start = time.process_time()
            try:
                return fn(*args)
            finally:
                cpu[phase] = cpu.get(phase, 0.0) + time.process_time() - start

        store = self.raw_store.pinned()  # one snapshot throughout, its manifest read once
        con = store.connect()
        tables = table_readers(store, con)
        changed = store.changed_partitions(before) if before else {}
        files: dict[str, dict[str, str]] = {s.source.name: dict(old["files"].get(s.source.name, {})) if old else {}
                                            for s in self.plan.sources}
        generation = uuid.uuid4().hex[:12]
        con.execute("CREATE OR REPLACE TEMP TABLE entities AS SELECT row_number() OVER () AS eid, merchant_id, "
                    "?::TIMESTAMP AS as_of FROM merchants", [as_of.to_pydatetime()])
        recomputed: dict[str, list[str]] = {}
        days: dict[str, int] = {}
        prefix: dict[str, str] = dict(old.get("prefix", {})) if old else {}
        for source_plan in self.plan.sources:
            name = source_plan.source.name
            months = None if old is None else timed("changes", self._touched, con, (store, before), source_plan,
                                                     changed, pd.Timestamp(old["as_of"]), as_of)
            previous = dict(files[name])
            delta = None
            if months is None:
                files[name] = timed("partials", self._write, con, source_plan, tables, None, generation, previous)
                recomputed[name] = sorted(files[name])
            elif months:
                written = timed("partials", self._write, con, source_plan, tables, months, generation, previous)
                for m in months:
                    files[name].pop(m, None)
                files[name].update(written)
                recomputed[name] = sorted(months)
                (days[name],) = fetch_one(con, "SELECT count(*) FROM touched")
                kept = self._read([self.dir / previous[m] for m in sorted(months) if m in previous], source_plan,
                                  tables)
                delta = delta_sql(source_plan, "touched_partials", f"(SELECT * FROM {kept} o WHERE {_touched_sql()})")
            if source_plan.prefixed:
                prefix[name] = timed("prefix", self._prefix, con, source_plan, tables,
                                     old if months is not None else None, files[name], delta, as_of, generation)
        new_state = {"as_of": as_of.isoformat(), "raw_snapshot_id": store.snapshot_id,
                     "plan": _plan_hash(self.plan), "files": files, "prefix": prefix}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{STATE}.tmp"
        tmp.write_text(json.dumps(new_state, indent=1, sort_keys=True))
        tmp.replace(self.dir / STATE)
        self._collect(new_state)
        frame = timed("roll-up", self._roll_up, con, tables, files, prefix, as_of)
        return DailyRefresh(frame, as_of, recomputed, full=old is None, cpu_seconds=cpu, days=days)

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

    def _write(self, con: duckdb.DuckDBPyConnection, source_plan: SourcePlan, tables: dict[str, str],
               months: set[str] | None, generation: str, previous: dict[str, str]) -> dict[str, str]:
        """The partials of the given months (None: all) into a new generation, per day and per month
        (`whole/`); month -> its folder. Of a month, only the `touched` days are computed (into the temp
        table `touched_partials`); the other days' partials are copied from its `previous` folder."""
        source = source_plan.source
        rows = {source.name: source_rows_sql(source, source_plan.features, tables)}
        folder = self.dir / source.name / f"gen={generation}"
        folder.mkdir(parents=True, exist_ok=True)
        if months is None:
            days = partials_sql(source_plan, rows, "true")
        else:
            touched = _touched_sql("facts", "CAST(facts.fact_time AS DATE)")
            con.execute("CREATE OR REPLACE TEMP TABLE touched_partials AS "
                        + partials_sql(source_plan, rows, f"({_months_sql(months)}) AND {touched}"))
            kept = self._read([self.dir / previous[m] for m in sorted(months) if m in previous], source_plan, tables)
            days = f"SELECT * FROM {kept} o WHERE NOT {_touched_sql()} UNION ALL BY NAME SELECT * FROM touched_partials"
        by_month = "(FORMAT parquet, PARTITION_BY (month), OVERWRITE_OR_IGNORE)"
        con.execute(f"COPY (SELECT strftime(day, '%Y-%m') AS month, * FROM ({days})) TO '{folder}' {by_month}")
        written = {p.name.removeprefix("month="): str(p.relative_to(self.dir)) for p in sorted(folder.glob("month=*"))}
        if written:
            read = f"read_parquet('{folder}/month=*/*.parquet', hive_partitioning = false)"
            con.execute(f"COPY (SELECT strftime(day, '%Y-%m') AS month, * FROM ({months_sql(source_plan, read)})) "
                        f"TO '{folder / WHOLE}' {by_month}")
        return written

    def _prefix(self, con: duckdb.DuckDBPyConnection, source_plan: SourcePlan, tables: dict[str, str],
                old: dict[str, Any] | None, files: dict[str, str], delta: str | None, as_of: pd.Timestamp,
                generation: str) -> str:
        """Write the source's prefix sums as of as_of (`features.daily.prefix_sql`): rolled forward from the old
        state's with the change `delta` (`delta_sql`) of the days recomputed into `files`; anew without it."""
        name = source_plan.source.name
        folder = self.dir / name / f"gen={generation}"
        folder.mkdir(parents=True, exist_ok=True)
        read = partial(self._read, source_plan=source_plan, tables=tables)
        current = read([self.dir / f for f in files.values()])
        types = {c: _sum_type(t) for c, t, *_ in con.execute(f"DESCRIBE SELECT * FROM {current}").fetchall()}
        if old is None or name not in old.get("prefix", {}):
            sql = prefix_sql(source_plan, as_of, current, types)
        else:
            old_as_of = pd.Timestamp(old["as_of"])
            crossed = {f"{d:%Y-%m}" for d in crossed_days(source_plan, old_as_of, as_of)}
            days = read([self.dir / f for m, f in files.items() if m in crossed])
            sql = prefix_sql(source_plan, as_of, days, types, f"read_parquet('{self.dir / old['prefix'][name]}')",
                             old_as_of, delta)
        con.execute(f"COPY ({sql}) TO '{folder / 'prefix.parquet'}' (FORMAT parquet)")
        return str((folder / "prefix.parquet").relative_to(self.dir))

    def _collect(self, state: dict[str, Any]) -> None:
        """Remove the generations no month of the state names any more."""
        kept = {Path(f).parts[1] for months in state["files"].values() for f in months.values()}
        kept |= {Path(f).parts[1] for f in state["prefix"].values()}
        for folder in self.dir.glob("*/gen=*"):
            if folder.name not in kept:
                shutil.rmtree(folder, ignore_errors=True)

    def _partials(self, files: dict[str, str], source_plan: SourcePlan, tables: dict[str, str],
                  as_of: pd.Timestamp, features: list[Feature], mixed: bool) -> str:
        """The partials these features read as of as_of (`features.daily.rolled_sql`): the days of the months
        they reach back to, or (mixed) the days of their edge months and the other months whole."""
        days = [f.lookback_days for f in features]
        first = None if None in days else f"{as_of - pd.Timedelta(days=max(days)):%Y-%m}"  # type: ignore[type-var]
        reach = {m: f for m, f in files.items() if first is None or m >= first}
        if not mixed:
            return self._read([self.dir / f for f in reach.values()], source_plan, tables)
        edges = edge_months(features, as_of)
        day_rows = self._read([self.dir / f for m, f in reach.items() if m in edges], source_plan, tables)
        whole = [self.dir / Path(f).parent / WHOLE / Path(f).name for f in reach.values()]
        month_rows = self._read(whole, source_plan, tables)
        return (f"(SELECT *, false AS is_month FROM {day_rows} UNION ALL BY NAME "
                f"SELECT *, true AS is_month FROM {month_rows})")

    def _read(self, folders: list[Path], source_plan: SourcePlan, tables: dict[str, str]) -> str:
        """Partial files as one relation (an empty one of the same columns when there are none)."""
        if not folders:
            rows = {source_plan.source.name: source_rows_sql(source_plan.source, source_plan.features, tables)}
            return f"({partials_sql(source_plan, rows, 'false')})"
        listed = ", ".join(f"'{p}/*.parquet'" for p in sorted(folders))
        return f"read_parquet([{listed}], hive_partitioning = false)"

    def _roll_up(self, con: duckdb.DuckDBPyConnection, tables: dict[str, str], files: dict[str, dict[str, str]],
                 prefix: dict[str, str], as_of: pd.Timestamp) -> pd.DataFrame:
        merchants = con.execute(
            f"SELECT merchant_id, ?::TIMESTAMP AS as_of FROM {tables.get('merchants', 'merchants')} "
            "WHERE onboarded_at < ?::TIMESTAMP ORDER BY merchant_id", [as_of.to_pydatetime()] * 2).df()
        entities = normalise_entities(merchants)
        con.register("batch", entities)
        con.execute("CREATE OR REPLACE TEMP TABLE entities AS SELECT row_number() OVER () AS eid, * FROM batch")
        relations = {}
        for source_plan in self.plan.sources:
            relation = partial(self._partials, files[source_plan.source.name], source_plan, tables, as_of)
            sums = prefix.get(source_plan.source.name)
            relations[f"r_{source_plan.source.name}"] = (
                rolled_sql(source_plan, relation, f"read_parquet('{self.dir / sums}')" if sums else None),
                source_plan.features)
        direct = by_source(self.plan.direct)
        rows = {name: source_rows_sql(SOURCES[name], fs, tables) for name, fs in direct.items()}
        for name, fs in direct.items():
            relations[f"d_{name}"] = (source_sql(SOURCES[name], fs, rows), fs)
        features = con.execute(assemble_sql(relations, FEATURES)).df()
        return entities.merge(features, on=KEYS, how="left", validate="one_to_one")
