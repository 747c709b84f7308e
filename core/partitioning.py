"""The raw store's partitions: the month of a row's own time, and the hash bucket of its merchant.

Every raw table has `merchant_id`, so a merchant's rows of every table share one bucket: the per-merchant
features, a foreign key to `merchants` and a merchant's scores all stay inside one bucket, which a worker
can read alone. The bucket must be the same in every process, on every machine and in every version
(a store written today is read by workers tomorrow), so it is CRC-32 of the id's UTF-8 bytes, not Python's
`hash()` (salted per process) nor DuckDB's `hash()` (free to change between releases).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MONTH, BUCKET = "month", "bucket"
"""The raw store's partition columns (Delta's; readers of a table never see them)."""

UNPARTITIONED = "none"
"""The month of a row whose time is missing or unreadable: such a batch is rejected, but is validated first."""


def merchant_bucket(merchant_ids: pa.Array | pa.ChunkedArray, buckets: int) -> pa.Array:
    """The bucket (0 .. buckets-1, int16) of each merchant id; a missing id is bucket 0.

    Hashes each distinct id once (a batch repeats its merchants many times), then spreads the codes."""
    ids = merchant_ids.combine_chunks() if isinstance(merchant_ids, pa.ChunkedArray) else merchant_ids
    encoded = pc.dictionary_encode(ids.cast(pa.string()))
    codes = np.fromiter(
        (zlib.crc32(v.encode()) % buckets for v in encoded.dictionary.to_pylist()),
        dtype=np.int16,
        count=len(encoded.dictionary),
    )
    return pc.fill_null(pa.array(codes, pa.int16()).take(encoded.indices), 0)


def month_key(times: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The partition month (`YYYY-MM`) of each timestamp; `UNPARTITIONED` where it is missing."""
    values = times.combine_chunks() if isinstance(times, pa.ChunkedArray) else times
    ids = pc.add(pc.multiply(pc.year(values), 12), pc.subtract(pc.month(values), 1))
    encoded = pc.dictionary_encode(ids)  # strftime per row costs 0.5 s a million rows; per month, nothing
    names = [UNPARTITIONED if i is None else f"{i // 12:04d}-{i % 12 + 1:02d}" for i in encoded.dictionary.to_pylist()]
    return pc.fill_null(pa.array(names, pa.string()).take(encoded.indices), UNPARTITIONED)


def partition_key(month: str, bucket: int) -> str:
    """A partition's name in the manifest: its folder in the Delta table (`month=2024-01/bucket=3`)."""
    return f"{MONTH}={month}/{BUCKET}={bucket}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """(month, bucket) of a `partition_key`."""
    month, bucket = (part.split("=", 1)[1] for part in key.split("/"))
    return month, int(bucket)


def split_by_partition(rows: pa.Table, time_column: str, buckets: int) -> dict[str, pa.Table]:
    """The rows of each partition (`partition_key`), in their given order within it.

    Rows whose time or merchant cannot be read as such (a missing or mistyped column: the batch will be
    rejected for it) go to month `UNPARTITIONED`, bucket 0, so they are still validated and reported."""
    if rows.num_rows == 0:
        return {}
    names = rows.column_names
    readable = (
        time_column in names and pa.types.is_timestamp(rows.column(time_column).type)
        and "merchant_id" in names and pa.types.is_string(rows.column("merchant_id").type)
    )
    if not readable:
        return {partition_key(UNPARTITIONED, 0): rows}
    months = pc.dictionary_encode(month_key(rows.column(time_column)))
    bucket = merchant_bucket(rows.column("merchant_id"), buckets).to_numpy()
    codes = months.indices.to_numpy().astype(np.int64) * buckets + bucket
    order = np.argsort(codes, kind="stable")
    ids, starts = np.unique(codes[order], return_index=True)
    stops = [*starts[1:], len(order)]
    month_names = months.dictionary.to_pylist()
    # One take of the whole table, then zero-copy slices: a take per partition cost 1.5x as much.
    ordered = rows.take(pa.array(order))
    return {
        partition_key(month_names[code // buckets], int(code % buckets)): ordered.slice(start, stop - start)
        for code, start, stop in zip(ids.tolist(), starts.tolist(), stops, strict=True)
    }
