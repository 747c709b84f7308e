"""Append-only decision log: one JSON line per decision, enough to reproduce it later.

A line names the bundle that decided, the hash of the feature values it used (and the values themselves
when the caller sent them), the request, and the outcome. `replay` re-scores a line with its bundle.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from serving.bundle import Bundle


def inputs_hash(features: dict[str, Any]) -> str:
    """Stable hash of feature values (key order does not matter), to prove which inputs were scored."""
    return hashlib.sha256(orjson.dumps(features, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


class AuditLog:
    """Writes each record with one `write(2)` on an O_APPEND descriptor, so lines never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        os.close(self._fd)


def read_audit(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def replay(record: dict[str, Any], bundles_dir: Path, bundle: Bundle | None = None) -> dict[str, Any]:
    """Re-score a logged decision with the bundle that made it: returns `pd`, `grade` and `decision`.

    Pass that bundle already loaded to replay many lines of it without loading it once per line.
    """
    from serving.bundle import load_bundle

    if bundle is None:
        bundle = load_bundle(bundles_dir / record["bundle_id"])
    elif bundle.bundle_id != record["bundle_id"]:
        raise ValueError(f"request {record['request_id']} was decided by bundle {record['bundle_id']}, "
                         f"not {bundle.bundle_id}")
    scored = bundle.score_features(record.get("features") or bundle.features_of(record["merchant_id"]))
    if scored.inputs_hash != record["inputs_hash"]:
        raise ValueError(f"the inputs of request {record['request_id']} differ from the ones logged")
    decision = bundle.decide(scored, record.get("product"), record.get("requested_amount"))
    return {"pd": scored.pd, "grade": scored.grade, "decision": decision and decision["outcome"]}
