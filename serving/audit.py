"""Append-only decision log: one JSON line per decision, enough to reproduce it later.

A line names the bundle that decided, the hash of the feature values it used (and the values themselves
when the caller sent them), the request, and the outcome. `serving.bundle.replay` re-scores a line with its bundle.

Durability: no answer leaves the service before the lines its request wrote are on storage
(`fdatasync`). One `fdatasync` costs milliseconds on a disk, so they are shared: `DurableAnswers` holds
each response until a sync covers its lines, and while one sync runs, the lines of every other request
gather for the next (group commit). Rotation: before each line the log checks that its path still names
the open file and reopens it when the file was moved or removed.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.responses import JSONResponse

from core.errors import ScfriskError

log = logging.getLogger(__name__)


class AuditError(ScfriskError):
    """A decision's audit line could not be written or synced; the decision must not be answered."""


def inputs_hash(features: dict[str, Any]) -> str:
    """Stable hash of feature values (key order does not matter), to prove which inputs were scored."""
    return hashlib.sha256(orjson.dumps(features, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


@dataclass
class _Written:
    """The last line a request wrote (set by `AuditLog.write`, read by `DurableAnswers`)."""

    audit: AuditLog | None = None
    seq: int = 0


_REQUEST_LINES: contextvars.ContextVar[_Written | None] = contextvars.ContextVar("audit_lines", default=None)


class AuditLog:
    """Writes each record with one `write(2)` on an O_APPEND descriptor, so lines never interleave.

    `write` appends (microseconds) and `commit` makes lines durable; lines are numbered so a commit knows
    whether an earlier sync already covered them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        """Guards the descriptor and the line count."""
        self._fd = self._open()
        self._written = 0
        self._synced = 0
        self._failed_through = 0
        """Lines up to this one were covered by a failed sync: their fate is unknown, so never say durable."""
        self._commit_lock: asyncio.Lock | None = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc}") from exc

    def _follow_rotation(self) -> None:
        """Reopen when the path no longer names the open file (moved or removed by log rotation)."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        mine = os.fstat(self._fd)
        if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
            return
        fd = self._open()
        old, self._fd = self._fd, fd
        try:
            os.fdatasync(old)  # lines already in the rotated file stay durable when it is kept
        finally:
            os.close(old)
        log.info("audit log %s was rotated; writing to a new file", self.path)

    def write(self, record: dict[str, Any]) -> int:
        """Append one line; returns its number. Durable only after `commit` of that number."""
        line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        with self._lock:
            try:
                self._follow_rotation()
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                raise AuditError(f"cannot write the audit log {self.path}: {exc}") from exc
            self._written += 1
            seq = self._written
        pending = _REQUEST_LINES.get()
        if pending is not None:
            pending.audit, pending.seq = self, seq
        return seq

    def _sync(self) -> int:
        """fdatasync every line written so far; returns the number of the last one covered."""
        with self._lock:
            target, fd = self._written, os.dup(self._fd)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return target

    async def commit(self, seq: int) -> None:
        """Return once line `seq` is on storage; one sync serves every line written before it started."""
        if self._commit_lock is None:
            self._commit_lock = asyncio.Lock()
        async with self._commit_lock:
            if seq > self._synced:
                try:
                    self._synced = await asyncio.to_thread(self._sync)
                except OSError as exc:
                    self._failed_through = self._written
                    raise AuditError(f"cannot sync the audit log {self.path}: {exc}") from exc
            if seq <= self._failed_through:
                raise AuditError(f"a sync of the audit log {self.path} failed; line {seq} may be lost")

    def close(self) -> None:
        with self._lock:
            os.fdatasync(self._fd)
            os.close(self._fd)


class DurableAnswers:
    """Pure ASGI middleware: hold a response until the audit lines its request wrote are on storage.

    A request whose line cannot be written or synced is answered 500 (the service's fault), never with a
    decision the log does not hold.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        written = _Written()
        token = _REQUEST_LINES.set(written)

        async def durable_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and written.audit is not None:
                await written.audit.commit(written.seq)
            await send(message)

        try:
            await self.app(scope, receive, durable_send)
        except AuditError as exc:
            log.error("%s", exc)
            problem = JSONResponse({"detail": "the decision could not be recorded in the audit log, so it is not "
                                              "given; retry later"}, status_code=500)
            await problem(scope, receive, send)
        finally:
            _REQUEST_LINES.reset(token)


def read_audit(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
