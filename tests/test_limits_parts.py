"""The limits flow per slice of the book: part files merged in the whole's order, strategy tables from the
parts' sums; the flow's process holds neither the book nor its tables' rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import features.offline_store as offline
import pipelines.limits as limits_module
from credit.limits import compute_limits
from credit.policy import load_policy
from credit.strategy import backtest_limits, merge_sums, strategy_sums, strategy_tables, tables_of
from features.offline_store import in_turn, read_rows
from pipelines.limits import limits_table, partitioned_limits, row_ranges
from testkit.synthetic import limit_inputs

POLICY = load_policy(Path(__file__).resolve().parents[1] / "policy.toml")


def _assert_tables_equal(got, expected) -> None:
    for name, table in expected.items():
        pd.testing.assert_frame_equal(getattr(got, name), table, check_exact=False, rtol=1e-12)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 37 rows, so a small book is merged in many chunks that straddle parts and products."""
    monkeypatch.setattr(offline, "WRITE_ROWS", 37)
    monkeypatch.setattr(limits_module, "WRITE_ROWS", 37)


def _snapshot(trained) -> pd.DataFrame:
    """The explanation tests' merchants with the limit engine's features: a feature snapshot of the model."""
    extra = limit_inputs(len(trained.frame))
    return trained.frame.drop(columns="pd").merge(
        extra[["merchant_id", *extra.columns.difference(trained.frame.columns)]], on="merchant_id")


def test_limits_merged_from_slices_of_the_snapshot_equal_the_table_of_the_whole(trained, tmp_path, small_chunks):
    """Each slice's limits written where it is computed, merged product after product in the snapshot's merchant
    order: the frame `limits_table` gives for the whole snapshot, value for value and type for type; the
    strategy sums sent back give the whole's strategy tables; no part file is left behind."""
    snapshot_path = tmp_path / "as_of.parquet"
    pq.write_table(pa.Table.from_pandas(_snapshot(trained), preserve_index=False), snapshot_path, row_group_size=500)
    out = tmp_path / "limits" / "limits.parquet"  # a folder the flow makes
    sums = partitioned_limits(str(snapshot_path), pafs.LocalFileSystem(), trained.model, "7", POLICY, 5, out, in_turn)

    whole = limits_table(pd.read_parquet(snapshot_path), trained.model, "7", POLICY)
    pd.testing.assert_frame_equal(pd.read_parquet(out), whole, check_exact=True)
    assert pq.ParquetFile(out).metadata.num_rows == len(whole)
    _assert_tables_equal(tables_of(sums), strategy_tables(whole))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["as_of.parquet", "limits", "limits.parquet"]


def test_limits_of_a_snapshot_on_object_storage_are_merged_onto_the_flows_disk(trained, bucket, tmp_path):
    """The parts are written beside the snapshot, on the store every worker reads (not on the flow's disk,
    which a worker of a remote cluster does not see), and removed once merged."""
    from core import storage

    fs, _ = storage.filesystem(f"s3://{bucket}/features")
    arrow = storage.arrow_filesystem(fs)
    snapshot = f"{bucket}/features/as_of.parquet"
    pq.write_table(pa.Table.from_pandas(_snapshot(trained), preserve_index=False), snapshot, filesystem=arrow)
    out = tmp_path / "limits" / "limits.parquet"
    partitioned_limits(snapshot, arrow, trained.model, "7", POLICY, 3, out, in_turn)
    whole = limits_table(pd.read_parquet(snapshot, filesystem=arrow), trained.model, "7", POLICY)
    pd.testing.assert_frame_equal(pd.read_parquet(out), whole, check_exact=True)
    fs.invalidate_cache()
    assert fs.find(bucket) == [snapshot]


def test_row_ranges_cover_the_rows_in_slices_a_task_reads_alone(tmp_path):
    frame = pd.DataFrame({"merchant_id": [f"M{i:04d}" for i in range(1000)], "x": np.arange(1000.0)})
    path = tmp_path / "f.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=64)
    ranges = row_ranges(1000, 7)
    assert len(ranges) == 7 and ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a < b and b == c for (a, b), (c, _) in zip(ranges, ranges[1:] + [(1000, None)], strict=True))
    pieces = [read_rows(str(path), a, b) for a, b in ranges]
    pd.testing.assert_frame_equal(pd.concat(pieces, ignore_index=True), frame)
    assert row_ranges(3, 8) == [(0, 1), (1, 2), (2, 3)]  # never an empty slice


def test_strategy_tables_from_the_sums_of_parts_equal_those_of_the_whole():
    """Book and backtest summed per part (parts of uneven size, one with no eligible row): the same tables as
    the whole's, the cut-off curve included."""
    book = compute_limits(limit_inputs(3000, seed=2), POLICY)
    rng = np.random.default_rng(5)
    test = limit_inputs(2000, seed=3).assign(product=rng.choice(list(POLICY.products), 2000))
    backtest = backtest_limits(test.assign(defaulted=(rng.uniform(size=2000) < test["pd"]).astype(int)), POLICY)
    for frame in (book, backtest):
        refused = frame.index[~frame["eligible"]][:1]
        rest = frame.drop(index=refused)
        cuts = [0, 40, 700, len(rest)]
        parts = [frame.loc[refused], *(rest.iloc[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True))]
        _assert_tables_equal(tables_of(merge_sums([strategy_sums(p) for p in parts])), strategy_tables(frame))


def test_every_cutoff_of_the_curve_is_exact_for_the_rows_it_approves():
    """A cut-off from the PD grid's sums states what approving every eligible row with PD <= it gives: its
    approvals, bad rates and profits are those of exactly those rows."""
    rng = np.random.default_rng(1)
    test = limit_inputs(4000, seed=4).assign(product=rng.choice(list(POLICY.products), 4000))
    backtest = backtest_limits(test.assign(defaulted=(rng.uniform(size=4000) < test["pd"]).astype(int)), POLICY)
    tables = strategy_tables(backtest)
    for row in tables.cutoff_curve.itertuples():
        product = backtest[backtest["product"] == row.product]
        approved = product[product["eligible"] & (product["pd"] <= row.cutoff_pd)]
        assert row.approved == len(approved) and row.approval_rate == len(approved) / len(product)
        np.testing.assert_allclose([row.expected_bad_rate, row.expected_profit, row.realised_bad_rate,
                                    row.realised_profit],
                                   [approved["pd"].mean(), approved["expected_profit"].sum(),
                                    approved["defaulted"].mean(), approved["realised_profit"].sum()], rtol=1e-12)
    per_product = tables.cutoff_curve.groupby("product")
    assert (per_product.size() >= 90).all()  # about one cut-off per PD percentile
    eligible = backtest[backtest["eligible"]].groupby("product", observed=True).size()
    assert per_product["approved"].max().to_dict() == eligible.to_dict()  # the last approves every eligible row
