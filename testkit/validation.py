"""Validating tables already in memory, as the ingest flow does for a batch it reads (tests use it)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import partial
from pathlib import Path

import pyarrow as pa

from core.rules import ReferenceKeys
from core.schemas import TableSpec
from core.settings import Settings
from core.validation import BatchValidation, check_frames, to_validation_frame
from reporting.validation_page import write_validation_page


def validate_tables(
    tables: Mapping[str, pa.Table],
    specs: Mapping[str, TableSpec],
    reference_keys: ReferenceKeys,
    settings: Settings,
    now: datetime,
) -> Path | None:
    """Validate tables already in memory (see `BatchValidation`); the validation page if written, or the
    error."""
    validation = BatchValidation(settings, now, partial(write_validation_page, settings.path("validation")))
    for name, table in tables.items():
        checks = check_frames(specs[name], table, reference_keys)
        validation.validate(specs[name], to_validation_frame(table, name), checks, reference_keys)
    return validation.finish()
