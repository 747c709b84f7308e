"""Incremental online features: per-merchant daily partial aggregates, rolled into the windows exactly.

The online vector is every feature as of one midnight T. Windows roll for every merchant every day, but a
window of whole days is a sum of whole days: as of a midnight, a fact of day d has an age in (n - 1, n] days
with n = T - d, so it is in the window (lag l, width w) exactly when l < n <= l + w (`features.definitions`).
So each source keeps, per (merchant, day), partial aggregates of its rows as of T (`partials_sql`), and the
windowed features are aggregates of those partials (`rolled_sql`):

- `sum(x)` and `count(*)` add up; `avg(x)` is a sum over a count; `max(x)` is the max of the daily maxima;
- `min(age_days ...)` is the age of the day's latest fact (`max(epoch_us(time))`), the same arithmetic as
  the row-level SQL, so bit-equal; `avg(age_days)` is count x T minus the sum of the times (exact integers);
- `count(DISTINCT f(time))` of a day-level f (months) counts the distinct f(day) over days with a fact;
- the days with a fact (a two-stage feature keyed by the fact's own day, `order_day`, counting its keys)
  sum a per-day indicator, like any count;
- other two-stage features whose key is a function of the day (`week`) group the rolled daily values by
  that key, then apply their own outer aggregate unchanged.

The windows of sums, counts and averages read neither: per merchant and window boundary a (an offset in
days), the prefix sum S_a of each partial over the days before T - a (`prefix_sql`), rolled forward from
day to day; the window (l, l + w] is S_l - S_(l+w) (`Rolled.prefix_value`).

Row filters and the point-in-time masks (`cancelled_at < as_of` ...) are applied inside the partials; a
filter on a day-level column (`week < 26`) at the roll-up. The partials are also added up per month
(`months_sql`): a plain window reads the days of the months it covers in part (`edge_months`) and one row
for each month it covers whole. What does not decompose this way (distinct
buyers or debtors, per-loan latest values, the merchant profile) stays `direct`: the ordinary point-in-time
SQL over the raw store, limited to those features.

A day's partials change only when one of its rows changes or a time of one of its rows (a refund, a due
date, a delivery) falls between the old and the new as_of; `features.daily_store` recomputes exactly those
(merchant, day) pairs. Pure functions: SQL text from the definitions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import pandas as pd

from core.schemas import TABLES
from features.definitions import COUNT_KEYS, DERIVED, FEATURES, SOURCES, Feature, Source
from features.sql import RECENT_DAYS, facts_sql, per_key_sql, single_sql, window_predicate


@dataclass(frozen=True)
class Rolled:
    """A feature computed from daily partials: its roll-up SQL, `{where}` standing for its day predicate."""

    feature: Feature
    template: str
    day_filter: str | None
    """The part of the feature's filter left to the roll-up (on day-level columns); the rest is in the partials."""

    def value(self) -> str:
        """Over day rows (`age_days` = n)."""
        return self.template.replace("{where}", window_predicate(replace(self.feature, filter=self.day_filter)))

    def mixed_value(self) -> str:
        """Over day and month rows (`mixed_sql`): a month row counts when the whole month is in the window,
        a day row when it is and its month is not (the window's edge months)."""
        whole = window_predicate(replace(self.feature, filter=None))

        def inside(lo: str, hi: str) -> str:
            return whole.replace("age_days >", f"{lo} >").replace("age_days <=", f"{hi} <=")

        where = f"{inside('n_lo', 'n_hi')} AND (is_month OR NOT ({inside('m_lo', 'm_hi')}))"
        return self.template.replace("{where}", where)

    @property
    def offsets(self) -> tuple[int, ...] | None:
        """The day offsets a of the prefix sums this feature reads (`prefix_value`), or None when it does not
        decompose into them: a plain window of sums and counts only (`max`, the latest fact, keys and
        day-level filters read the day rows), whose empty window reads as its sums' 0 (a fill of 0, a count,
        or an average: its sum is unknown exactly when its count is 0)."""
        f = self.feature
        rest = re.sub(SUM, "", self.template)
        if f.per is not None or self.day_filter is not None or re.search(r"\bp\d+\b|\w\(", rest.replace(
                "coalesce(", "").replace("CAST(", "").replace("nullif(", "")):
            return None
        if not (f.fill == 0 or self.template.startswith("coalesce(") or f.aggregation.startswith("avg(")):
            return None
        return (f.lag_days,) if f.window_days is None else (f.lag_days, f.lag_days + f.window_days)

    def prefix_value(self) -> str:
        """Over one row per entity of prefix sums `s<a>_<p>` (`prefix_sql`: the partial p summed over the days
        before as_of - a days): the window (l, l + w] is S_l - S_(l + w), all history S_l."""
        low, *high = self.offsets or ()
        return re.sub(SUM, lambda m: f"(s{low}_{m[1]}" + "".join(f" - s{a}_{m[1]}" for a in high) + ")",
                      self.template)


SUM = r"sum\((p\d+)\) FILTER \(WHERE \{where\}\)"
"""A rolled template's sum of one partial over the feature's window."""


@dataclass(frozen=True)
class SourcePlan:
    """The rolled features of one source and the daily partials they read."""

    source: Source
    rolled: tuple[Rolled, ...]
    partials: tuple[tuple[str, str], ...]
    """(column, aggregate SQL over one merchant-day of facts, filter included)."""

    @property
    def features(self) -> list[Feature]:
        return [r.feature for r in self.rolled]

    @property
    def prefixed(self) -> list[Rolled]:
        """The features read from prefix sums (`Rolled.offsets`)."""
        return [r for r in self.rolled if r.offsets is not None]

    @property
    def offsets(self) -> list[int]:
        """The offsets of the prefix sums kept (`prefix_sums`)."""
        return sorted({a for a, _ in self.prefix_sums})

    @property
    def summed_by_month(self) -> list[Rolled]:
        """The features read from month sums and edge days (`rolled_sql`'s mixed passes): plain windows not
        read from prefix sums."""
        return [r for r in self.rolled if r.feature.per is None and r.day_filter is None and r.offsets is None]

    @property
    def month_columns(self) -> list[str]:
        """The partials those features read: all the month sums keep (`months_sql`)."""
        used = {c for r in self.summed_by_month for c in re.findall(r"\bp\d+\b", r.template)}
        return [c for c, _ in self.partials if c in used]

    @property
    def prefix_sums(self) -> list[tuple[int, str]]:
        """The (offset, partial) pairs of the prefix sums the prefixed features read."""
        return sorted({(a, c) for r in self.prefixed for c in re.findall(SUM, r.template) for a in r.offsets or ()})

    @property
    def prefix_columns(self) -> list[str]:
        """The partials the prefixed features sum."""
        used = {c for _, c in self.prefix_sums}
        return [c for c, _ in self.partials if c in used]


@dataclass(frozen=True)
class Plan:
    sources: tuple[SourcePlan, ...]
    direct: tuple[Feature, ...]
    """Non-derived features computed by the point-in-time SQL over the raw store."""


def _words(sql: str | None) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", sql or ""))


def _column_kinds(source: Source) -> tuple[set[str], set[str]]:
    """(day-level columns: functions of the fact's time and age only; columns that move with as_of
    continuously: those using age_days). Both transitive through earlier columns."""
    raw = {c.name for spec in TABLES.values() for c in spec.columns} | {name for name, _ in source.columns}
    raw |= {"as_of", "age_days"}
    day_level: set[str] = set()
    ageing = {"age_days"}
    for name, expr in source.columns:
        used = _words(expr) & raw
        if used <= {source.time_column, "age_days"} | day_level:
            day_level.add(name)
        if used & ageing:
            ageing.add(name)
    return day_level - {source.time_column}, ageing


def _decompose(f: Feature, source: Source, day_level: set[str],
               ageing: set[str]) -> tuple[list[str], str, str | None] | None:
    """(partial aggregates over a merchant-day, roll-up template over `p0`, `p1`..., the filter left to the
    roll-up) or None: the feature stays direct."""
    filters = _words(f.filter) & ({n for n, _ in source.columns} | {"age_days"})
    if filters & (day_level | ageing) and not filters <= day_level:
        return None  # a filter mixing day-level and row-level columns cannot be split
    row_filter = f.filter if f.filter and not filters & day_level else None
    if f.per is not None and f.per not in day_level:
        return None
    if _counts_days(f, source):
        # The days with a fact (in the window, under the filter): a sum of one indicator per merchant-day.
        indicator = f"CAST(count(*){f' FILTER (WHERE {row_filter})' if row_filter else ''} > 0 AS INTEGER)"
        return [indicator], "coalesce(sum(p0) FILTER (WHERE {where}), 0)", None if row_filter else f.filter
    if f.source == "merchants" or (f.fill is None and f.aggregation == "count(*)"):
        return None
    where = " FILTER (WHERE {where})"
    match = re.fullmatch(r"(\w+)\((.*)\)", f.aggregation)
    if match is None:
        return None
    name, arg = match.groups()
    moving = bool(_words(arg) & ageing)
    if name == "count" and arg == "*":
        parts, template = ["count(*)"], f"coalesce(sum(p0){where}, 0)"
    elif name == "sum" and not moving:
        parts, template = [f"sum({arg})"], f"sum(p0){where}"
    elif name == "max" and not moving:
        parts, template = [f"max({arg})"], f"max(p0){where}"
    elif name == "avg" and not moving:
        parts = [f"sum({arg})", f"count({arg})"]
        template = f"CAST(sum(p0){where} AS DOUBLE) / nullif(sum(p1){where}, 0)"
    elif name == "avg" and arg == "age_days":
        parts = ["sum(epoch_us(fact_time))", "count(*)"]
        template = (f"CAST(sum(p1){where} * epoch_us(any_value(as_of)) - sum(p0){where} AS DOUBLE) / 86400e6 "
                    f"/ nullif(sum(p1){where}, 0)")
    elif name == "min" and _words(arg) - {"age_days"} == set() and "age_days" in arg:
        # The youngest fact is the day's latest: min over rows of (T - t) / day is (T - max t) / day.
        parts = ["max(epoch_us(fact_time))"]
        template = re.sub(r"\bage_days\b", f"((epoch_us(any_value(as_of)) - max(p0){where}) / 86400e6)", arg)
    elif name == "count" and arg.upper().startswith("DISTINCT ") and _words(arg[9:]) & (
            {n for n, _ in source.columns} | set(TABLES[source.table].column_index)) <= {source.time_column}:
        parts = ["count(*)"]
        template = f"count({arg}) FILTER (WHERE ({{where}}) AND p0 > 0)"
    else:
        return None
    if row_filter:
        parts = [f"{p} FILTER (WHERE {row_filter})" for p in parts]
    return parts, template, None if row_filter else f.filter


def _counts_days(f: Feature, source: Source) -> bool:
    """The feature counts the days with a fact: keyed by the fact's own day, keys with a fact counted."""
    return (f.per is not None and f.outer == COUNT_KEYS and f.aggregation == "count(*)"
            and dict(source.columns).get(f.per) == f"CAST({source.time_column} AS DATE)")


def plan(features: tuple[Feature, ...] = FEATURES) -> Plan:
    """Which features roll up from daily partials (per source) and which stay direct."""
    rolled: dict[str, list[tuple[Feature, list[str], str, str | None]]] = {}
    direct: list[Feature] = []
    for f in features:
        if f.source == DERIVED:
            continue
        source = SOURCES[f.source]
        split = _decompose(f, source, *_column_kinds(source))
        if split is None:
            direct.append(f)
        else:
            rolled.setdefault(f.source, []).append((f, *split))
    sources = []
    for name, items in rolled.items():
        columns: dict[str, str] = {}
        out = []
        for f, parts, template, day_filter in items:
            for i, part in enumerate(parts):
                column = columns.setdefault(part, f"p{len(columns)}")
                template = re.sub(rf"\bp{i}\b", f"__{column}", template)
            plain = replace(f, per=None, outer=None) if _counts_days(f, SOURCES[name]) else f
            out.append(Rolled(plain, template.replace("__p", "p"), day_filter))
        sources.append(SourcePlan(SOURCES[name], tuple(out), tuple((c, sql) for sql, c in columns.items())))
    return Plan(tuple(sources), tuple(direct))


def partials_sql(plan: SourcePlan, rows: Mapping[str, str]) -> str:
    """Partial aggregates per (merchant_id, day) of the source's facts (from `rows`: all of them, or the
    days to recompute) as of each entity's `as_of`."""
    facts = facts_sql(plan.source, plan.features, rows)
    parts = "".join(f",\n       {sql} AS {column}" for column, sql in plan.partials)
    return (
        f"SELECT merchant_id, CAST(fact_time AS DATE) AS day{parts}\n"
        f"FROM (\n{facts}\n) AS facts\nGROUP BY ALL"
    )


def prefix_sql(plan: SourcePlan, as_of: pd.Timestamp, days: str, types: Mapping[str, str],
               old: str | None = None, old_as_of: pd.Timestamp | None = None, delta: str | None = None) -> str:
    """The prefix sums as of the midnight as_of: one row per merchant, a column `s<a>_<p>` for each (offset
    a, partial p) a feature reads (`SourcePlan.prefix_sums`): p summed over the days before as_of - a; a
    window is then two of them (`Rolled.prefix_value`).

    Rolled forward from `old` (the same as of old_as_of): S_a = old S_a, plus `delta` (rows of new minus old
    partials, `partials_sql`'s shape) on the days before old_as_of - a (a refund months ago shifts every
    prefix sum past its day), plus the current partials `days` in [old_as_of - a, as_of - a) (the days the
    roll moved past each boundary). Without `old`, the sums of `days` before as_of - a (the first build).
    Sums and counts of exact numbers (integers, fixed-point decimals), so rolled forward or summed anew
    they are equal; `types` casts each back to its partial's type."""
    def boundary(t: pd.Timestamp, a: int) -> str:
        return f"DATE '{t:%Y-%m-%d}' - {a}"

    def sums(relation: str, days_of: Callable[[int], str]) -> str:
        # One grouping per offset over its own days (not a FILTER per column: DuckDB evaluates each alone).
        by_offset: dict[int, list[str]] = {}
        for a, c in plan.prefix_sums:
            by_offset.setdefault(a, []).append(f"sum({c}) AS s{a}_{c}")
        return "\n  UNION ALL BY NAME ".join(
            f"SELECT merchant_id, {', '.join(values)} FROM {relation} WHERE {days_of(a)} GROUP BY merchant_id"
            for a, values in by_offset.items())

    if old is None or old_as_of is None:
        parts = [sums(days, lambda a: f"day < {boundary(as_of, a)}")]
    else:
        listed = ", ".join(f"DATE '{d:%Y-%m-%d}'" for d in crossed_days(plan, old_as_of, as_of)) or "NULL"
        parts = [sums(f"(SELECT * FROM {days} WHERE day IN ({listed}))",
                      lambda a: f"day >= {boundary(old_as_of, a)} AND day < {boundary(as_of, a)}"),
                 f"SELECT * FROM {old}"]
        if delta is not None:
            parts.append(sums(delta, lambda a: f"day < {boundary(old_as_of, a)}"))
    totals = ", ".join(f"CAST(coalesce(sum(s{a}_{c}), 0) AS {types[c]}) AS s{a}_{c}" for a, c in plan.prefix_sums)
    union = "\n  UNION ALL BY NAME ".join(parts)
    return f"SELECT merchant_id, {totals} FROM (\n  {union}) GROUP BY merchant_id"


def crossed_days(plan: SourcePlan, old_as_of: pd.Timestamp, as_of: pd.Timestamp) -> list[pd.Timestamp]:
    """The days a roll from old_as_of to as_of moves past the prefix sums' boundaries: [old_as_of - a,
    as_of - a) for each offset a."""
    return sorted({old_as_of + pd.Timedelta(days=i - a) for a in plan.offsets for i in range((as_of - old_as_of).days)})


def delta_sql(plan: SourcePlan, new: str, old: str | None) -> str:
    """The change of the partials (`prefix_columns`) of recomputed days: new rows minus old ones, the days
    whose partials did not change left out (most of a recomputed month's: they would only spread zeros)."""
    columns = plan.prefix_columns
    minus = "" if old is None else (
        f" UNION ALL SELECT merchant_id, day, {', '.join(f'-coalesce({c}, 0) AS {c}' for c in columns)} FROM {old}")
    changed = " OR ".join(f"sum({c}) <> 0" for c in columns)
    return (f"(SELECT merchant_id, day, {', '.join(f'sum({c}) AS {c}' for c in columns)} FROM ("
            f"SELECT merchant_id, day, {', '.join(f'coalesce({c}, 0) AS {c}' for c in columns)} FROM {new}{minus}) "
            f"GROUP BY ALL HAVING {changed})")


def lookback(features: list[Feature]) -> int | None:
    """The longest lookback of these features in days; None when one reads all history."""
    lookbacks = [f.lookback_days for f in features]
    return None if None in lookbacks else max(lookbacks)  # type: ignore[type-var]


def months_sql(plan: SourcePlan, days: str) -> str:
    """The daily partials (`days`, a relation of `partials_sql`'s shape) added up per merchant and month,
    `day` being the month's first: sums and counts add, maxima take the max. Only the `month_columns`."""
    parts = "".join(f", {'max' if sql.startswith('max(') else 'sum'}({c}) AS {c}" for c, sql in plan.partials
                    if c in plan.month_columns)
    return f"SELECT merchant_id, CAST(date_trunc('month', day) AS DATE) AS day{parts} FROM {days} GROUP BY ALL"


def edge_months(features: list[Feature], as_of: pd.Timestamp) -> set[str]:
    """The months a window of these features covers in part as of a midnight (its first and last day's):
    their days must be read one by one; the months in between count whole."""
    out = set()
    for f in features:
        if f.window_days is not None:
            first = as_of - pd.Timedelta(days=f.lag_days + f.window_days)
            out |= {f"{first:%Y-%m}", f"{as_of - pd.Timedelta(days=f.lag_days + 1):%Y-%m}"}
    return out


def rolled_sql(plan: SourcePlan, partials: Callable[[list[Feature], bool], str], prefix: str | None) -> str:
    """One row per entity with partials in reach, one column per rolled feature: the windows as of the
    entity's midnight `as_of` over the partials. `partials(features, mixed)` is a relation of
    `partials_sql`'s shape holding at least the days these features reach back to; with `mixed`, the
    days of their `edge_months` and the `months_sql` rows of the rest, told apart by `is_month`. `prefix`:
    the prefix sums (`prefix_sql`) the `prefixed` features read (None when there are none).

    Like `features.sql.source_sql`, the aggregates run in passes each bounded by its longest window: the
    plain features in three (within RECENT_DAYS, longer, all history) over month rows and edge days, each
    two-stage key (and a plain feature with a day-level filter) over day rows."""
    source = plan.source
    day_level, _ = _column_kinds(source)
    used = _words(" ".join(f"{f.filter or ''} {f.per or ''}" for f in plan.features))
    columns = "".join(f",\n       {expr} AS {name}" for name, expr in source.columns if name in day_level & used)
    by_name = {r.feature.name: r for r in plan.rolled}

    def facts(fs: list[Feature], mixed: bool) -> str:
        days = lookback(fs)
        # A month row is dated its first day: up to a month before the window's first day.
        bound = "" if days is None else f" AND p.day >= CAST(e.as_of AS DATE) - {days + 31 if mixed else days}"
        today = "CAST(e.as_of AS DATE)"
        ranges = (f"date_diff('day', last_day(p.day), {today}) AS m_lo, "
                  f"date_diff('day', CAST(date_trunc('month', p.day) AS DATE), {today}) AS m_hi, "
                  f"CASE WHEN p.is_month THEN m_lo ELSE age_days END AS n_lo, "
                  f"CASE WHEN p.is_month THEN m_hi ELSE age_days END AS n_hi, ") if mixed else ""
        return (
            "(SELECT *" + columns + " FROM (\n"
            f"SELECT e.eid, e.as_of, {today} - p.day AS age_days, {ranges}p.day AS {source.time_column}, "
            "p.* EXCLUDE (merchant_id, day)\n"
            f"FROM entities e JOIN {partials(fs, mixed)} p ON p.merchant_id = e.merchant_id{bound})) AS facts"
        )

    prefixed = {r.feature.name for r in plan.prefixed}
    plain = [r.feature for r in plan.summed_by_month]
    recent = [f for f in plain if f.lookback_days is not None and f.lookback_days <= RECENT_DAYS]
    forever = [f for f in plain if f.lookback_days is None]
    groups = [fs for fs in (recent, [f for f in plain if f not in recent + forever], forever) if fs]
    passes = [single_sql(facts(fs, True), fs, lambda f: by_name[f.name].mixed_value()) for fs in groups]
    if prefixed:
        values = "".join(f", {r.prefix_value()} AS {r.feature.name}" for r in plan.prefixed)
        passes.insert(0, f"(SELECT e.eid{values} FROM entities e JOIN {prefix} s ON s.merchant_id = e.merchant_id)")
    keys: dict[str | None, list[Feature]] = {}
    for f in plan.features:
        if f not in plain and f.name not in prefixed:
            keys.setdefault(f.per, []).append(f)
    passes += [per_key_sql(facts(fs, False), per, fs, lambda f: by_name[f.name].value()) if per
               else single_sql(facts(fs, False), fs, lambda f: by_name[f.name].value()) for per, fs in keys.items()]
    first, *rest = passes
    return f"SELECT * FROM {first}" + "".join(f"\n  FULL JOIN {p} USING (eid)" for p in rest)
