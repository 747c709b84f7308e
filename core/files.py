"""File helpers every layer shares: content hashes, and TOML files and users' tables read with errors a user
can act on."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ScfriskError

if TYPE_CHECKING:
    import pandas as pd


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


def read_frame(path: Path | str, what: str = "table", as_text: bool = False) -> pd.DataFrame:
    """A user's Parquet file or folder, or CSV file, as a DataFrame. `as_text` keeps every CSV cell as written
    (no guessed types, empty stays empty) for callers that infer each column's kind themselves."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise ScfriskError(f"{what} {path} does not exist")
    if path.is_dir() or path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".txt"):
        return pd.read_csv(path, dtype=str, keep_default_na=False) if as_text else pd.read_csv(path)
    raise ScfriskError(f"{what} {path}: unsupported format '{path.suffix}' (use .parquet or .csv)")
