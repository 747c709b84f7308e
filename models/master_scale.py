"""Master scale: PD bands mapped to grades, read from the `[master_scale]` table of the policy TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Grade(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grade: str = Field(min_length=1)
    max_pd: float = Field(gt=0.0, le=1.0)


class MasterScale(BaseModel):
    """Grades from best to worst; a PD belongs to the first grade whose `max_pd` is >= it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grades: tuple[Grade, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _bands_cover_zero_to_one(self) -> MasterScale:
        bounds = [g.max_pd for g in self.grades]
        if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"master_scale.grades: max_pd must strictly increase, got {bounds}")
        if bounds[-1] != 1.0:
            raise ValueError("master_scale.grades: the last grade must end at max_pd = 1.0 (no gap)")
        names = [g.grade for g in self.grades]
        if len(set(names)) != len(names):
            raise ValueError(f"master_scale.grades: grade names must be unique, got {names}")
        return self

    @property
    def names(self) -> list[str]:
        return [g.grade for g in self.grades]

    def grade_index(self, pd_values: np.ndarray) -> np.ndarray:
        """0 for the best grade; vectorised."""
        bounds = np.array([g.max_pd for g in self.grades])
        return np.minimum(np.searchsorted(bounds, np.asarray(pd_values, dtype=float), side="left"), len(bounds) - 1)

    def assign(self, pd_values: np.ndarray) -> np.ndarray:
        return np.array(self.names, dtype=object)[self.grade_index(pd_values)]

    def grade_table(self, pd_values: np.ndarray, defaulted: np.ndarray) -> pd.DataFrame:
        """Count, mean PD and observed bad rate per grade, best first (empty grades kept, as NaN)."""
        frame = pd.DataFrame({"grade_index": self.grade_index(pd_values), "pd": pd_values, "bad": defaulted})
        stats = frame.groupby("grade_index").agg(count=("bad", "size"), mean_pd=("pd", "mean"),
                                                 bad_rate=("bad", "mean"))
        stats = stats.reindex(range(len(self.grades)))
        stats.insert(0, "grade", self.names)
        stats["count"] = stats["count"].fillna(0).astype(int)
        return stats.reset_index(drop=True)

    def is_monotone(self, pd_values: np.ndarray, defaulted: np.ndarray, min_count: int = 1,
                    tolerance_z: float = 0.0) -> bool:
        """Observed bad rate never falls from a grade to a worse one (grades with < min_count rows skipped).

        With `tolerance_z` > 0 a fall counts only when it exceeds that many standard errors of the
        difference: on a small test set an empty-of-defaults good grade next to one default is noise.
        """
        table = self.grade_table(pd_values, defaulted)
        kept = table.loc[table["count"] >= min_count]
        rates, counts = kept["bad_rate"].to_numpy(), kept["count"].to_numpy()
        pooled = np.clip((rates[:-1] * counts[:-1] + rates[1:] * counts[1:]) / (counts[:-1] + counts[1:]), 0, 1)
        se = np.sqrt(pooled * (1 - pooled) * (1 / counts[:-1] + 1 / counts[1:]))
        return bool(np.all(rates[:-1] - rates[1:] <= tolerance_z * se))


def load_master_scale(policy_file: Path | str) -> MasterScale:
    data = tomllib.loads(Path(policy_file).read_text())
    return MasterScale(**data["master_scale"])
