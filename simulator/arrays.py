"""Vectorised draws and Arrow builders every part of the simulator shares."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.schemas import TIMESTAMP

DAY = 86_400


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def lognormal(rng: np.random.Generator, mean: np.ndarray | float, sigma: float, size: int) -> np.ndarray:
    """Lognormal draws with the given MEAN (not median), so scale parameters read as averages."""
    return np.asarray(mean) * rng.lognormal(-0.5 * sigma**2, sigma, size)


def day(seconds: np.ndarray) -> np.ndarray:
    return seconds - seconds % DAY


def ts(seconds: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    micros = np.asarray(seconds, dtype=np.int64) * 1_000_000
    return pa.array(micros, TIMESTAMP, mask=None if valid is None else ~valid)


def strings(codes: np.ndarray, labels: list[str] | tuple[str, ...]) -> pa.Array:
    """Label per row from integer codes, built in Arrow so millions of rows cost no Python strings."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(labels)).dictionary_decode()


def table(schema: pa.Schema, columns: dict[str, object]) -> pa.Table:
    return pa.table(columns, schema=schema)


def ids(n: int) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.int64)
