"""The PD at origination of every live loan, kept from one day to the next (`monitor/origination.parquet` under
`SCFRISK_HOME`).

The early warning compares a loan's PD now with its PD at origination: the same model on the merchant's
features as of the application (point in time). Those do not move from day to day unless the model
changes, or a correction of the raw store reaches the merchant's facts before the application, yet computing
them for the 64k live loans of the 10M-order platform was the largest part of the monitor's day. So each PD is
kept with what it depends on: the loan's merchant and application time, the model (`PDModel.fingerprint`),
the feature set version, the raw store and the snapshot it was computed at. A later run reuses it unless a
row of the merchant that those features read changed since that snapshot with a time before the application
(`features.staleness`), and computes the rest. The file is replaced whole (temp file and rename) and holds
only the day's live loans, of one model: it does not grow.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import ScfriskError
from core.raw_store import RawStore
from features.definitions import feature_set_version, with_inputs
from features.staleness import changed_rows, stale
from features.training_set import get_training_set
from models.pd_model import PDModel

log = logging.getLogger(__name__)

CACHE_FILE = "origination.parquet"
KEY = ["loan_id", "merchant_id", "applied_at"]
META = b"scfrisk.origination"
"""The parquet metadata key of what the kept PDs depend on besides their rows' keys."""


@dataclass(frozen=True)
class OriginationPD:
    pd: np.ndarray
    """The PD at origination of each loan, in the loans' order."""
    computed: np.ndarray
    """Which of them were computed (not reused)."""


def origination_pd(store: RawStore, model: PDModel, loans: pd.DataFrame) -> np.ndarray:
    """The model's PD on each loan's merchant features as of its application (`applied_at`), in order."""
    if not len(loans):
        return np.array([], dtype=float)
    entities = loans[["merchant_id", "applied_at"]].rename(columns={"applied_at": "as_of"})
    return model.predict_pd(get_training_set(entities, store, features=with_inputs(model.feature_names)))


def _keys(loans: pd.DataFrame) -> pd.DataFrame:
    keys = loans[KEY].reset_index(drop=True)
    return keys.assign(merchant_id=keys["merchant_id"].astype(str),
                       applied_at=keys["applied_at"].astype("datetime64[us]"))


def _kept(path: Path, store: RawStore, tag: dict[str, str | None], model: PDModel) -> pd.DataFrame | None:
    """The PDs of the file that still hold in `store` for `model`, or None if none can."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    found = json.loads((table.schema.metadata or {}).get(META, b"{}"))
    if any(found.get(k) != tag[k] for k in ("model", "feature_set_version", "raw_store")):
        return None
    kept = table.to_pandas()
    if found["snapshot_id"] != tag["snapshot_id"]:
        try:
            before = store.at(found["snapshot_id"])
        except ScfriskError:  # that snapshot was vacuumed: what changed since cannot be told
            return None
        features = with_inputs(model.feature_names)
        changed = store.changed_partitions(before)
        changes = changed_rows(store, before, changed, features, store.connect())
        entities = kept[["merchant_id", "applied_at"]].rename(columns={"applied_at": "as_of"})
        kept = kept[~stale(entities, changes, features)]
    return kept


def _write(path: Path, rows: pd.DataFrame, tag: dict[str, str | None]) -> None:
    table = pa.Table.from_pandas(rows, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META: json.dumps(tag).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def cached_origination_pd(folder: Path, store: RawStore, model: PDModel, loans: pd.DataFrame) -> OriginationPD:
    """`origination_pd`, reusing the PDs kept in `folder` that still hold (module doc) and keeping today's."""
    store = store.pinned()  # the snapshot recorded is the one the features are read from
    tag = {"model": model.fingerprint(), "feature_set_version": feature_set_version(), "raw_store": store.url,
           "snapshot_id": store.snapshot_id}
    path = folder / CACHE_FILE
    keys = _keys(loans)
    kept = _kept(path, store, tag, model)
    if kept is None:
        known = pd.Series(False, index=keys.index)
        values = pd.Series(np.nan, index=keys.index)
    else:
        joined = keys.merge(kept, on=KEY, how="left", indicator=True, validate="one_to_one")
        known, values = joined["_merge"].eq("both"), joined["pd_origination"].astype(float)
    computed = ~known.to_numpy()
    values[computed] = origination_pd(store, model, keys[computed])
    _write(path, keys.assign(pd_origination=values.to_numpy()), tag)
    log.info("PD at origination: %d of %d live loans reused, %d computed", int(known.sum()), len(keys),
             int(computed.sum()))
    return OriginationPD(values.to_numpy(), computed)
