"""The simulator: exact schemas, a consistent end-of-window snapshot, a default signal models can learn."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from core.errors import ScfriskError
from core.schemas import TABLES
from pipelines.cli import app
from simulator import SimulationConfig, simulate_platform
from tests.conftest import SAMPLE

SMALL = SimulationConfig(n_merchants=300, months=12, seed=3, chunk_size=120)
SAMPLE_END = "2026-01-01"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "platform"
    simulate_platform(SMALL, out)
    return out


@pytest.fixture(scope="module")
def sample() -> Path:
    if not (SAMPLE / "orders").is_dir():
        pytest.skip("data_samples/platform is not there")
    return SAMPLE


def _db(root: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name in [*TABLES, "oracle/loans"]:
        con.execute(
            f"create view {name.replace('/', '_')} as select * from read_parquet('{root / name}/part-*.parquet')"
        )
    return con


def _tables(root: Path) -> dict[str, object]:
    return {name: pq.read_table(root / name) for name in [*TABLES, "oracle/loans", "oracle/merchant_health"]}


def test_same_seed_same_tables_other_seed_other_tables(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    simulate_platform(SMALL, again)
    first, second = _tables(small), _tables(again)
    assert all(first[name].equals(second[name]) for name in first)
    other = tmp_path / "other"
    simulate_platform(SimulationConfig(n_merchants=300, months=12, seed=4, chunk_size=120), other)
    assert not first["orders"].equals(pq.read_table(other / "orders"))


@pytest.mark.parametrize("root", ["small", "sample"])
def test_every_part_file_has_the_exact_arrow_schema(root: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(root)
    for name, spec in TABLES.items():
        parts = sorted((folder / name).glob("part-*.parquet"))
        assert parts, f"no part files for {name}"
        for part in parts:
            schema = pq.read_schema(part)
            assert schema.equals(spec.arrow_schema), f"{part}: {schema} != {spec.arrow_schema}"


@pytest.mark.parametrize(("root", "end"), [("small", "2025-01-01"), ("sample", SAMPLE_END)])
def test_nothing_happens_at_or_after_the_window_end(
    root: str, end: str, request: pytest.FixtureRequest
) -> None:
    con = _db(request.getfixturevalue(root))
    for name, spec in TABLES.items():
        for column in spec.timestamp_columns:
            if spec.column_index[column].scheduled:
                continue  # a promise or due date agreed before the end may point past it
            late = con.execute(f"select count(*) from {name} where {column} >= timestamp '{end}'").fetchone()[
                0
            ]
            assert late == 0, f"{name}.{column}: {late} rows at or after {end}"


@pytest.mark.parametrize("root", ["small", "sample"])
def test_ordered_timestamp_pairs_hold(root: str, request: pytest.FixtureRequest) -> None:
    con = _db(request.getfixturevalue(root))
    for name, spec in TABLES.items():
        for earlier, later in spec.ordered:
            bad = con.execute(f"select count(*) from {name} where {later} < {earlier}").fetchone()[0]
            assert bad == 0, f"{name}: {bad} rows with {later} before {earlier}"


@pytest.mark.parametrize("root", ["small", "sample"])
def test_keys_are_unique_and_foreign_keys_resolve(root: str, request: pytest.FixtureRequest) -> None:
    con = _db(request.getfixturevalue(root))
    for name, spec in TABLES.items():
        rows, keys = con.execute(f"select count(*), count(distinct {spec.key}) from {name}").fetchone()
        assert rows == keys > 0, f"{name}.{spec.key}: {rows} rows, {keys} distinct keys"
        for fk in spec.foreign_keys:
            dangling = con.execute(
                f"select count(*) from {name} t anti join {fk.table} r on t.{fk.column} = r.{fk.ref_column}"
            ).fetchone()[0]
            assert dangling == 0, f"{name}.{fk.column}: {dangling} rows without a {fk.table} row"


def test_status_is_the_latest_state_at_the_window_end(small: Path) -> None:
    con = _db(small)
    wrong = con.execute(
        """select status, count(*) from orders where not case status
             when 'cancelled' then cancelled_at is not null and shipped_at is null
             when 'refunded' then refunded_at is not null and delivered_at is not null and settled_at is null
             when 'completed' then settled_at is not null and refunded_at is null
             when 'delivered' then delivered_at is not null and settled_at is null and refunded_at is null
             when 'shipped' then shipped_at is not null and delivered_at is null
             when 'paid' then shipped_at is null and cancelled_at is null end
           group by status"""
    ).fetchall()
    assert wrong == []
    assert (
        con.execute("select count(*) from orders where (rating is null) <> (rated_at is null)").fetchone()[0]
        == 0
    )


def test_applications_need_three_months_of_history(small: Path) -> None:
    con = _db(small)
    early = con.execute(
        """select count(*) from loan_applications a join merchants m using (merchant_id)
           where date_diff('month', greatest(m.onboarded_at, timestamp '2024-01-01'), a.applied_at) < 3"""
    ).fetchone()[0]
    assert early == 0
    onboarded = con.execute(
        "select count(*) filter (where onboarded_at < '2024-01-01'), "
        "count(*) filter (where onboarded_at >= '2024-01-01') "
        "from merchants"
    ).fetchone()
    assert min(onboarded) > 0.2 * SMALL.n_merchants, (
        f"onboarding not spread around the window start: {onboarded}"
    )


def test_sample_default_rate_is_in_band_and_matches_loan_performance(sample: Path) -> None:
    con = _db(sample)
    outcome = con.execute(
        """select o.defaulted, coalesce(max(p.days_past_due) filter (
                  where p.observed_at <= l.disbursed_at + interval 12 month), 0) as worst_dpd
           from oracle_loans o join loans l using (loan_id) left join loan_performance p using (loan_id)
           where o.outcome_complete group by o.loan_id, o.defaulted"""
    ).df()
    assert len(outcome) >= 8000
    assert 0.03 <= outcome["defaulted"].mean() <= 0.08
    # The oracle's default is exactly what a label built from loan_performance sees.
    assert ((outcome["worst_dpd"] >= 90) == outcome["defaulted"]).all()
    cured = outcome.loc[~outcome["defaulted"], "worst_dpd"]
    assert cured.max() <= 60 and 0.03 < (cured > 0).mean() < 0.3


def test_the_oracle_says_when_a_loan_reaches_90_days_past_due(small: Path) -> None:
    """`dpd90_at` is set for defaulters only, and each month end's days past due is 90+ exactly from then on."""
    con = _db(small)
    assert con.execute("select count(*) from oracle_loans where defaulted <> (dpd90_at is not null)").fetchone()[0] == 0
    wrong, late = con.execute(
        """select count(*) filter (where (p.days_past_due >= 90) <> coalesce(p.observed_at >= o.dpd90_at, false)),
                  count(*) filter (where p.days_past_due >= 90)
           from loan_performance p join oracle_loans o using (loan_id)"""
    ).fetchone()
    assert wrong == 0 and late > 0


def test_sample_true_pd_and_health_predict_default(sample: Path) -> None:
    oracle = _db(sample).execute("select * from oracle_loans where outcome_complete").df()
    defaulted = oracle["defaulted"]
    assert roc_auc_score(defaulted, oracle["true_pd"]) > 0.75
    assert roc_auc_score(defaulted, -oracle["health_at_application"]) > 0.72
    assert abs(oracle["true_pd"].mean() - defaulted.mean()) < 0.01
    # Not a deterministic function of the pre-application state: health after it matters too.
    assert roc_auc_score(defaulted, oracle["true_pd"]) < 0.95


def test_sample_gmv_peaks_in_june_and_november(sample: Path) -> None:
    gmv = (
        _db(sample)
        .execute(
            "select date_trunc('month', ordered_at) m, sum(amount) gmv from orders group by 1 order by 1"
        )
        .df()["gmv"]
        .to_numpy()
    )
    assert len(gmv) == 24
    for peak in (5, 10, 17, 22):  # June and November of both years
        assert gmv[peak] > 1.2 * (gmv[peak - 1] + gmv[peak + 1]) / 2


def test_sample_corporate_and_individual_merchants_differ(sample: Path) -> None:
    con = _db(sample)
    by_type = dict(
        con.execute(
            """select merchant_type, count(o.order_id) / count(distinct m.merchant_id)
               from merchants m left join orders o using (merchant_id) group by 1"""
        ).fetchall()
    )
    assert by_type["corporate"] > 1.8 * by_type["individual"]
    capital = dict(
        con.execute("select merchant_type, count(registered_capital) from merchants group by 1").fetchall()
    )
    assert capital["individual"] == 0 and capital["corporate"] > 0
    b2b = dict(
        con.execute(
            """select merchant_type, count(*) filter (where counterparty_id <> 'platform')
               from receivables join merchants using (merchant_id) group by 1"""
        ).fetchall()
    )
    assert b2b["individual"] == 0 and b2b["corporate"] > 0


def test_sample_health_drives_behaviour(sample: Path) -> None:
    """Worse-health merchant-months refund, complain and log in as designed."""
    con = _db(sample)
    con.execute(
        f"create view health as select * from read_parquet('{sample}/oracle/merchant_health/*.parquet')"
    )
    rates = con.execute(
        """select h.health < 0 as weak, avg((o.status = 'refunded')::int) refund_rate
           from orders o join health h on o.merchant_id = h.merchant_id
                and date_trunc('month', o.ordered_at) = h.month
           where o.ordered_at < '2025-11-01' group by 1"""
    ).fetchall()
    refund = dict(rates)
    assert refund[True] > 1.3 * refund[False]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": "2024-01-15"}, "first day of a month"),
        ({"start": "soon"}, "YYYY-MM-DD"),
        ({"months": 2}, "months"),
        ({"orders_per_month": 0}, "orders_per_month must be above 0"),
    ],
)
def test_bad_config_is_a_user_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ScfriskError, match=message):
        SimulationConfig(**kwargs)


def test_total_orders_follow_the_configured_volume(small: Path, tmp_path: Path) -> None:
    total = sum(pq.read_metadata(p).num_rows for p in (small / "orders").glob("part-*.parquet"))
    per_merchant_month = total / (SMALL.n_merchants * SMALL.months)
    assert 5 < per_merchant_month < 20, per_merchant_month
    # Larger sellers: ten times the orders per merchant-month (the CLI's shortest history, few merchants).
    result = CliRunner().invoke(app, ["simulate", "--merchants", "40", "--months", "20", "--seed", "3",
                                      "--orders-per-month", "100", "--out", str(tmp_path / "dense")])
    assert result.exit_code == 0, result.output
    dense = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "dense" / "orders").glob("part-*.parquet"))
    assert 7 * per_merchant_month < dense / (40 * 20) < 13 * per_merchant_month, (per_merchant_month, dense)


def test_sample_secured_products_go_to_merchants_with_the_collateral(sample: Path) -> None:
    con = _db(sample)
    share = con.execute(
        """select avg((exists (select 1 from inventory_receipts r where r.merchant_id = a.merchant_id
                                 and r.received_at < a.applied_at))::int)
           from loan_applications a where product = 'warehouse_receipt_financing'"""
    ).fetchone()[0]
    assert share > 0.95, (
        f"only {share:.1%} of warehouse-receipt applicants ever deposited goods before applying"
    )
    by_type = dict(
        con.execute(
            """select merchant_type, avg((product = 'receivable_financing')::int)
               from loan_applications join merchants using (merchant_id) group by 1"""
        ).fetchall()
    )
    assert by_type["corporate"] > 5 * by_type["individual"]


def test_the_committed_sample_is_what_the_generator_makes(sample: Path, tmp_path: Path) -> None:
    """data_samples/platform is regenerated by its README's command, so the two must agree.

    Integers, strings, booleans and timestamps agree exactly. A float computed through `exp` may differ
    in its last bit between numpy builds (SIMD kernels), so floats agree to 1e-12 relative.
    """
    import numpy as np

    from simulator import SimulationConfig, simulate_platform

    made = tmp_path / "platform"
    simulate_platform(SimulationConfig(n_merchants=3300, months=24, seed=42), made)
    committed, regenerated = _tables(sample), _tables(made)
    for name, table in committed.items():
        other = regenerated[name]
        assert table.schema.equals(other.schema), name
        assert table.num_rows == other.num_rows, name
        for column in table.column_names:
            a, b = table[column], other[column]
            if a.type in ("double", "float"):
                np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-12, err_msg=f"{name}.{column}")
            else:
                assert a.equals(b), f"{name}.{column} differs from the generator's output"
