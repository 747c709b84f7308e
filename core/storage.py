"""Where a store lives: a local folder or an object-storage URL, and the file systems that reach it.

One module decides what a store's address means, so the settings, the raw store (delta-rs for its
commits, fsspec for its own files) and the feature store (pyarrow over fsspec) agree on it: a plain path or
a `file://` URL is a local folder; `s3://`, `gs://` or `az://` is object storage, reached through fsspec's
package for it (s3fs, gcsfs, adlfs) and delta-rs's built-in client.

Options are delta-rs's names (object_store's `AWS_*` keys, the same as the environment variables both
delta-rs and boto read): a store that is given some passes them to delta-rs as they are, and to fsspec as
s3fs names them (`fsspec_options`). Credentials are best left to the environment, an IAM role or a
workload identity: then nothing secret is in a file or a process's arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # the settings import this module: a CLI error must not wait for pyarrow (tests/test_cli.py)
    import fsspec
    import pyarrow.fs as pa_fs

OBJECT_STORES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                 "abfss": "adlfs"}
"""Object stores both delta-rs and fsspec reach, by URL scheme, with the fsspec package each needs."""
S3_SCHEMES = ("s3", "s3a")
EXTRAS = {"s3fs": "pip install 'scfrisk[s3]'"}


def scheme(location: str | Path) -> str:
    """The URL scheme of a store's address; '' for a plain path."""
    text = str(location)
    return urlsplit(text).scheme.lower() if "://" in text else ""


def is_local(location: str | Path) -> bool:
    """A folder on this machine's file system: a plain path or a `file://` URL."""
    return scheme(location) in ("", "file")


def local_path(location: str | Path) -> Path:
    """The folder a local address names (`file:///srv/raw` -> /srv/raw)."""
    text = str(location)
    return Path(unquote(urlsplit(text).path)) if scheme(text) == "file" else Path(text)


def check_location(location: str) -> str:
    """The address if a store can live there; else `ValueError` in one line (the caller names the address):
    an unknown scheme, or one whose fsspec package is not installed."""
    kind = scheme(location)
    if kind in ("", "file"):
        if kind == "file" and urlsplit(location).netloc not in ("", "localhost"):
            raise ValueError("a file:// URL names no host: a local folder is file:///absolute/path")
        return location
    if kind not in OBJECT_STORES:
        known = ", ".join(f"{s}://" for s in ("file", *OBJECT_STORES))
        raise ValueError(f"a store is a local path or a URL of {known}, not {kind}://")
    import fsspec

    package = OBJECT_STORES[kind]
    try:
        fsspec.get_filesystem_class(kind)
    except ImportError:
        hint = EXTRAS.get(package, f"pip install {package}")
        raise ValueError(f"{kind}:// needs the {package} package, which is not installed ({hint})") from None
    return location


def fsspec_options(location: str, options: Mapping[str, str]) -> dict[str, Any]:
    """delta-rs's options of an S3 store as s3fs takes them; others reach fsspec through the environment.
    (s3fs ignores names it does not know, so delta-rs's names would silently not reach it.)"""
    if scheme(location) not in S3_SCHEMES:
        return {}
    named = {key.upper(): value for key, value in options.items()}
    out: dict[str, Any] = {}
    for ours, theirs in (("AWS_ENDPOINT_URL", "endpoint_url"), ("AWS_ACCESS_KEY_ID", "key"),
                         ("AWS_SECRET_ACCESS_KEY", "secret"), ("AWS_SESSION_TOKEN", "token")):
        if named.get(ours):
            out[theirs] = named[ours]
    if named.get("AWS_REGION"):
        out["client_kwargs"] = {"region_name": named["AWS_REGION"]}
    return out


def filesystem(location: str, options: Mapping[str, str] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of a store and the store's root path in it."""
    import fsspec

    return fsspec.core.url_to_fs(location, **fsspec_options(location, options or {}))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pa_fs.FileSystem:
    """The same file system for pyarrow: Arrow's own on a local disk (fsspec's costs a Python call per read),
    else fsspec's behind Arrow's interface, so it has the store's options whatever the environment says."""
    import pyarrow.fs as pa_fs

    if "file" in fs.protocol:
        return pa_fs.LocalFileSystem()
    return pa_fs.PyFileSystem(_one_lookup_handler()(fs))


@functools.cache
def _one_lookup_handler() -> type[pa_fs.FSSpecHandler]:
    """Arrow's handler of an fsspec file system, opening a file to read with one metadata request, not two:
    Arrow's own asks `isfile` first and the file it opens then asks for its size (a HEAD each on S3, a third
    of the requests of a scan of a store's small files). The open file's own lookup says it is missing."""
    import pyarrow.fs as pa_fs
    from pyarrow import PythonFile

    def opened(fs: fsspec.AbstractFileSystem, path: str) -> PythonFile:
        file = fs.open(path, mode="rb")
        if getattr(file, "details", {}).get("type", "file") != "file":  # a folder's name
            file.close()
            raise FileNotFoundError(path)
        return PythonFile(file, mode="r")

    class OneLookupHandler(pa_fs.FSSpecHandler):
        def open_input_stream(self, path: str) -> PythonFile:
            return opened(self.fs, path)

        def open_input_file(self, path: str) -> PythonFile:
            return opened(self.fs, path)

    return OneLookupHandler


def modified_time(info: Mapping[str, Any]) -> datetime:
    """When a file was last written, from its fsspec listing: `mtime` on a local disk, `LastModified` on S3."""
    if "mtime" in info:
        return datetime.fromtimestamp(info["mtime"], UTC)
    stamp = info["LastModified"]
    return stamp if isinstance(stamp, datetime) else datetime.fromisoformat(str(stamp))
