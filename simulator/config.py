"""What to simulate, checked on construction so a bad request fails before any work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np

from core.errors import ScfriskError
from core.settings import ModelConfig

HISTORY_MONTHS = 3
"""Months of data a merchant needs inside the window before it can apply."""
OUTCOME_MONTHS = 12
"""A loan's outcome window: default is 90+ days past due within this many months of disbursement."""


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate; the same config (seed included) always gives the same tables."""

    n_merchants: int = 2000
    months: int = 24
    seed: int = 42
    start: str | date = "2024-01-01"
    chunk_size: int = 5000
    orders_per_month: float = 10.0
    """Average orders per merchant-month of the window (heavy-tailed across merchants)."""

    def __post_init__(self) -> None:
        if self.n_merchants < 1:
            raise ScfriskError(f"n_merchants must be at least 1, got {self.n_merchants}")
        if self.months < HISTORY_MONTHS:
            raise ScfriskError(f"months must be at least {HISTORY_MONTHS}, got {self.months}")
        if not self.orders_per_month > 0:
            raise ScfriskError(f"orders_per_month must be above 0, got {self.orders_per_month}")
        if self.chunk_size < 1:
            raise ScfriskError(f"chunk_size must be at least 1, got {self.chunk_size}")
        try:
            first = np.datetime64(str(self.start), "D")
        except ValueError:
            raise ScfriskError(f"start must be a date YYYY-MM-DD, got {self.start!r}") from None
        if first != first.astype("datetime64[M]").astype("datetime64[D]"):
            raise ScfriskError(f"start must be the first day of a month, got {self.start}")

    @property
    def first_month(self) -> np.datetime64:
        return np.datetime64(str(self.start), "M")

    @property
    def end(self) -> np.datetime64:
        """First instant after the window: everything recorded in the snapshot happened before it."""
        return (self.first_month + self.months).astype("datetime64[s]")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_merchants // self.chunk_size)


def months_to_train(model: ModelConfig) -> int:
    """The shortest simulated history a PD model can be trained on with these model settings.

    Merchants apply only after `HISTORY_MONTHS` of data; a loan's label needs `label_horizon_months`
    after it; the out-of-time split needs at least one training month of labelled applications, then
    `valid_months` and `test_months`.
    """
    return HISTORY_MONTHS + 1 + model.valid_months + model.test_months + model.label_horizon_months
