"""File helpers every layer shares: content hashes and TOML files read with errors a user can act on."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

from core.errors import ScfriskError


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks so large Parquet files never sit in memory whole."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_toml(path: Path | str, error: type[ScfriskError], what: str) -> dict[str, Any]:
    """The parsed TOML file, or `error` saying that the `what` file is missing or not TOML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}") from exc
