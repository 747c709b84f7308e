"""The live bundle: the one reference requests read, swapped whole when the pointer names a new bundle.

A request takes the bundle reference once and keeps it to the end, so a reload (load the new bundle fully,
then swap one reference) never changes the answer of a request in flight. A bundle that cannot be loaded is
not swapped in: the old one keeps serving and `/readyz` says so.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from serving.bundle import POINTER, Bundle, BundleError, bundle_path, check_bundle, current_bundle_id
from serving.signing import BundleKey

log = logging.getLogger(__name__)


class LiveBundle:
    """The one reference requests read; replaced whole by `refresh`, never mutated.

    A bundle that fails to load is tried again as soon as the pointer or any of its files change (a
    repair), not on every poll: a load re-scores part of the bundle, and a broken one would do that, and
    log, every few seconds. Each distinct failure is logged once.
    """

    def __init__(self, published: Path, key: BundleKey | None) -> None:
        self.published = published
        self.key = key
        self.bundle: Bundle | None = None
        self.failed: tuple[str, str] | None = None
        """(bundle id, error) of the last bundle that could not be loaded."""
        self._tried: tuple[Any, ...] | None = None
        """What the pointer and the bundle's files were when that load failed."""

    def require(self) -> Bundle:
        bundle = self.bundle
        if bundle is None:
            if self.failed:
                raise HTTPException(503, f"no bundle is live: published bundle {self.failed[0]} cannot be served: "
                                         f"{self.failed[1]}")
            raise HTTPException(503, "no bundle is published yet: run the pipeline's publish step")
        return bundle

    def _state(self, target: str) -> tuple[Any, ...]:
        """The pointer's target and the identity, size and times of every file of that bundle."""
        try:
            folder = bundle_path(self.published, target)
        except BundleError:
            return (target,)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return (target, *((str(p), s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                          for p, s in ((p, p.stat()) for p in files)))

    async def refresh(self) -> None:
        """Load the bundle the pointer names if it is new or was repaired; on any failure keep the current
        one (this runs in the service's watcher task, which must outlive every error)."""
        try:
            target = current_bundle_id(self.published)
        except OSError as exc:
            return self._failure(POINTER, exc, None)
        live = self.bundle.bundle_id if self.bundle else None
        if target is None:
            return None
        if target == live:
            self.failed = self._tried = None  # pointed back at the live bundle: nothing is failing now
            return None
        state = None
        try:
            state = await asyncio.to_thread(self._state, target)
            if state == self._tried:
                return None
            bundle = await asyncio.to_thread(_load, bundle_path(self.published, target), self.key)
        except Exception as exc:  # any failure to load must leave the old bundle serving
            return self._failure(target, exc, state)
        replaced = [self.bundle] if self.bundle is not None else []  # the one reference left to it here
        self.bundle, self.failed, self._tried = bundle, None, None
        log.info("serving bundle %s (model %s, policy %s)", target, bundle.model_version, bundle.policy_version)
        if replaced:
            await _release(replaced)
        return None

    def _failure(self, target: str, exc: Exception, state: tuple[Any, ...] | None) -> None:
        error = self._public(f"{type(exc).__name__}: {exc}")
        if self.failed != (target, error):
            live = self.bundle.bundle_id if self.bundle else None
            log.error("bundle %s could not be loaded, still serving %s: %s", target, live, error)
        self.failed, self._tried = (target, error), state

    def _public(self, message: str) -> str:
        """The error without the workspace's absolute path."""
        return message.replace(str(self.published), "published")


RELEASE_SLICE = 1_000
"""Merchants' answers a replaced bundle frees at a time (`_release`)."""
RELEASE_WAIT_SECONDS = 30.0


async def _release(holder: list[Bundle]) -> None:
    """Free a replaced bundle a slice of its merchants at a time, between requests. Let go at once, its
    millions of objects were freed in one call holding the GIL: 0.36 and 0.42 s at 39,000 merchants
    (measured), every request waiting. Only once no request holds it any more (a request takes the reference
    for its own few milliseconds): until then, or past `RELEASE_WAIT_SECONDS`, it is left to go whole."""
    deadline = asyncio.get_running_loop().time() + RELEASE_WAIT_SECONDS
    while sys.getrefcount(holder[0]) > 2:  # the list's and getrefcount's own argument: nobody else's
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.01)
    online = holder.pop().online  # the last reference to the bundle: its other parts go now (arrays, cheap)
    merchants = list(online)
    for start in range(0, len(merchants), RELEASE_SLICE):
        for merchant in merchants[start:start + RELEASE_SLICE]:
            del online[merchant]
        await asyncio.sleep(0)


def _load(path: Path, key: BundleKey | None) -> Bundle:
    """`check_bundle` without the cyclic garbage collector: each full collection that building a bundle's
    millions of objects set off walked all of them and the live bundle's with the GIL held, stalling every
    request for 0.6 to 0.9 s, four times a load at 39,000 merchants (measured). A bundle has no reference
    cycles (a dropped one is freed by reference counting alone, checked): the collector has nothing to find
    in it: it is frozen out of every later collection, before the collector is back on (else its first
    collection walks all the objects made meanwhile: a 0.6 s stall, measured)."""
    gc.disable()
    try:
        bundle = check_bundle(path, key)
        gc.freeze()
        return bundle
    finally:
        gc.enable()
