"""What the flow process (the `scfrisk` command, the driver of a Dask cluster) holds while training: the rows it
reads and the text it hashes are bounded by what it keeps, not by the whole file or frame.

Memory is measured as the peak of Arrow's allocations (a proxy of its memory pool, set as the default), where
Parquet reads and pandas' text columns live: the process's own allocations, not its resident size, which the
allocator keeps after a free. (tracemalloc would add NumPy's, but slows pandas' text and hashing tenfold.)"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.offline_store import complete_rows
from pipelines.train import data_hash


class Peak:
    bytes = 0


POOLS: list[pa.MemoryPool] = []
"""Every proxy pool measured through: a buffer keeps a pointer to the pool that allocated it, so none is freed."""


@contextmanager
def allocation_peak() -> Iterator[Peak]:
    """The peak, above the start, of this process's Arrow allocations."""
    default = pa.default_memory_pool()
    proxy = pa.proxy_memory_pool(default)
    POOLS.append(proxy)
    pa.set_memory_pool(proxy)
    out = Peak()
    try:
        yield out
    finally:
        pa.set_memory_pool(default)
        out.bytes = proxy.max_memory()


def measured(fn: Callable[[], object]) -> tuple[object, int]:
    with allocation_peak() as peak:
        value = fn()
    return value, peak.bytes


def test_complete_rows_reads_a_row_group_at_a_time(tmp_path):
    """Only the complete loans are kept and the file is never held whole: the peak is the kept rows and one
    row group, far below the file decoded (here 10 times the kept rows)."""
    rng = np.random.default_rng(0)
    rows, groups = 160_000, 8
    frame = pd.DataFrame({f"x{i}": rng.normal(size=rows) for i in range(10)})
    frame["outcome_complete"] = rng.random(rows) < 0.1
    frame["merchant_id"] = pd.Series(rng.integers(0, 10**6, rows)).map("m{:07d}".format)
    path = tmp_path / "training_set.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=rows // groups)
    columns = ["merchant_id", *(f"x{i}" for i in range(10))]

    (got, loans), peak = measured(lambda: complete_rows(str(path), columns))

    expected = pd.read_parquet(path)
    expected = expected.loc[expected["outcome_complete"], columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    assert loans == rows
    whole = frame.memory_usage(deep=True).sum()
    kept = expected.memory_usage(deep=True).sum()
    assert peak < 4 * kept + 2 * whole / groups, (peak / 2**20, kept / 2**20, whole / 2**20)
    assert peak < whole / 2


def test_data_hash_is_the_whole_frames_text_hash_one_column_at_a_time():
    """The same fingerprint as hashing the whole frame as text, at a fraction of its peak: one column's text
    at a time (the whole frame as text is several times the frame)."""
    rng = np.random.default_rng(1)
    rows = 50_000
    frame = pd.DataFrame({f"x{i}": rng.normal(size=rows) for i in range(20)})
    frame["as_of"] = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 10**7, rows), unit="s")
    frame["segment"] = pd.Categorical(rng.choice(["micro", "small", None], rows))
    frame["merchant_id"] = pd.Series(rng.integers(0, 10**6, rows)).map("m{:07d}".format)
    frame.loc[::11, "x3"] = np.nan

    def whole_text() -> str:
        hashed = pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy()
        return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]

    fingerprint, peak = measured(lambda: data_hash(frame))
    expected, whole_peak = measured(whole_text)

    assert fingerprint == expected
    assert peak < whole_peak / 3, (peak / 2**20, whole_peak / 2**20)
