"""A tiny hand-made valid batch of every raw table (a handful of rows each), and a writer for it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.schemas import TABLES, conform


def ts(value: str | None) -> pd.Timestamp | None:
    return None if value is None else pd.Timestamp(value)


def valid_batch() -> dict[str, pd.DataFrame]:
    """Three merchants trading over January and February 2024, with one loan that is performing."""
    merchants = pd.DataFrame(
        {
            "merchant_id": ["M0000001", "M0000002", "M0000003"],
            "merchant_type": ["corporate", "individual", "corporate"],
            "category": ["apparel", "toys", "home"],
            "region": ["east", "west", "north"],
            "onboarded_at": [ts("2023-03-01"), ts("2023-06-15"), ts("2023-11-20")],
            "registered_capital": [500_000.0, None, 1_000_000.0],
        }
    )
    orders = pd.DataFrame(
        {
            "order_id": [1, 2, 3, 4, 5, 6],
            "merchant_id": ["M0000001", "M0000001", "M0000002", "M0000003", "M0000002", "M0000003"],
            "buyer_id": [10, 11, 12, 13, 14, 15],
            "ordered_at": [
                ts(d)
                for d in (
                    "2024-01-03 10:00",
                    "2024-01-05 09:30",
                    "2024-01-20 18:00",
                    "2024-02-02 12:00",
                    "2024-02-10 08:00",
                    "2024-02-15 20:00",
                )
            ],
            "amount": [120.0, 35.5, 80.0, 250.0, 19.9, 60.0],
            "status": ["completed", "cancelled", "refunded", "delivered", "shipped", "paid"],
            "promised_delivery_at": [
                ts(d)
                for d in ("2024-01-08", "2024-01-10", "2024-01-25", "2024-02-07", "2024-02-15", "2024-02-20")
            ],
            "shipped_at": [
                ts("2024-01-04"),
                None,
                ts("2024-01-21"),
                ts("2024-02-03"),
                ts("2024-02-11"),
                None,
            ],
            "delivered_at": [ts("2024-01-07"), None, ts("2024-01-24"), ts("2024-02-06"), None, None],
            "cancelled_at": [None, ts("2024-01-05 10:00"), None, None, None, None],
            "refunded_at": [None, None, ts("2024-01-30"), None, None, None],
            "rating": pd.array([5, None, 2, None, None, None], dtype="Int8"),
            "rated_at": [ts("2024-01-09"), None, ts("2024-01-26"), None, None, None],
            "settled_at": [ts("2024-01-15"), None, None, None, None, None],
        }
    )
    events = pd.DataFrame(
        {
            "event_id": [1, 2, 3],
            "merchant_id": ["M0000001", "M0000002", "M0000003"],
            "event_at": [ts("2024-01-02"), ts("2024-01-12"), ts("2024-02-01")],
            "event_type": ["login", "cs_response", "complaint"],
            "value": [None, 12.5, None],
        }
    )
    receipts = pd.DataFrame(
        {
            "receipt_id": [1, 2],
            "merchant_id": ["M0000001", "M0000003"],
            "warehouse_id": ["W01", "W02"],
            "category": ["apparel", "home"],
            "quantity": [100, 40],
            "appraised_value": [5_000.0, 12_000.0],
            "received_at": [ts("2024-01-05"), ts("2024-02-01")],
            "released_at": [ts("2024-02-20"), None],
        }
    )
    receivables = pd.DataFrame(
        {
            "receivable_id": [1, 2],
            "merchant_id": ["M0000001", "M0000002"],
            "counterparty_id": ["platform", "B0042"],
            "amount": [1_000.0, 450.0],
            "issued_at": [ts("2024-01-10"), ts("2024-02-01")],
            "due_at": [ts("2024-02-10"), ts("2024-03-01")],
            "paid_at": [ts("2024-02-08"), None],
        }
    )
    applications = pd.DataFrame(
        {
            "application_id": [1, 2],
            "merchant_id": ["M0000001", "M0000003"],
            "product": ["microloan", "order_financing"],
            "requested_amount": [10_000.0, 3_000.0],
            "applied_at": [ts("2024-01-15"), ts("2024-02-05")],
        }
    )
    loans = pd.DataFrame(
        {
            "loan_id": [1],
            "application_id": [1],
            "merchant_id": ["M0000001"],
            "product": ["microloan"],
            "principal": [8_000.0],
            "annual_rate": [0.12],
            "disbursed_at": [ts("2024-01-16")],
            "maturity_at": [ts("2024-07-16")],
        }
    )
    performance = pd.DataFrame(
        {
            "record_id": [1, 2],
            "loan_id": [1, 1],
            "merchant_id": ["M0000001", "M0000001"],
            "observed_at": [ts("2024-01-31"), ts("2024-02-29")],
            "days_past_due": [0, 3],
            "outstanding": [8_000.0, 6_700.0],
        }
    )
    return {
        "merchants": merchants,
        "orders": orders,
        "behaviour_events": events,
        "inventory_receipts": receipts,
        "receivables": receivables,
        "loan_applications": applications,
        "loans": loans,
        "loan_performance": performance,
    }


def to_arrow(name: str, frame: pd.DataFrame) -> pa.Table:
    """The frame in its schema types where they fit (a deliberately wrong column keeps its own type)."""
    return conform(pa.Table.from_pandas(frame, preserve_index=False), TABLES[name])


def write_batch(folder: Path, tables: dict[str, pd.DataFrame], fmt: str = "parquet") -> Path:
    """Write tables as `<table>.parquet`, `<table>.csv` or `<table>/part-00000.parquet` (fmt 'parts')."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        if fmt == "csv":
            frame.to_csv(folder / f"{name}.csv", index=False)
        elif fmt == "parts":
            (folder / name).mkdir(exist_ok=True)
            pq.write_table(to_arrow(name, frame), folder / name / "part-00000.parquet")
        else:
            pq.write_table(to_arrow(name, frame), folder / f"{name}.parquet")
    return folder
