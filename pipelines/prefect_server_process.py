"""The workspace's Prefect server process: Prefect's API app under uvicorn, which stops itself when nobody
uses it any more.

`pipelines.prefect_server` starts it detached (`python -m pipelines.prefect_server_process FACTORY --port N
--idle-seconds S --check-seconds C`, its working directory the workspace's `prefect` folder). Nothing
else would ever stop it, and a workspace is often thrown away (a test's or a demo's temporary folder), so
a watchdog thread checks every C seconds and stops the server, saying why in its log:

- when it served no request for S seconds. Every HTTP request and websocket counts, from its start to its
  end, so a long request or an open events socket is use; a command running a flow that calls no API for
  a long time keeps it alive by pinging `/api/health` (`prefect_server.ensure_server`);
- when `server.json` in its folder no longer names it (the folder was removed, or the state replaced):
  then no command can find it, and nothing can ever reuse it.

The decision is taken under the workspace's `server.lock`, the lock a command holds while it checks or
starts the server: a command that found the server answering has already counted as a request when the
watchdog gets the lock, and one that waited finds `server.json` gone and starts a new server. The lock
stays held until this process ends, so no command reuses a server that is shutting down.

The app is the one uvicorn's `--factory` would build, wrapped in an ASGI middleware counting requests;
the factory stays on the command line, where `prefect_server.is_running` looks for it. In-process rather
than a supervisor around `uvicorn`: one process to find and stop, and only the app sees every request.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

from pipelines.prefect_server import LOCK_FILE, LOG_TIME_FORMAT, STATE_FILE, read_state

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

GRACEFUL_SHUTDOWN_SECONDS = 5
"""An idle server has no request to finish; a folder removed under a busy one leaves nobody to answer."""


class UseRecorder:
    """ASGI middleware: how many requests are in flight, and when the last one started or ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self.last_use = time.monotonic()

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] not in ("http", "websocket"):  # the lifespan is not a use
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        self.last_use = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last_use = time.monotonic()

    def idle_seconds(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last_use


class Watchdog:
    """Stops `server` when `reason_to_stop` finds one (see the module docstring)."""

    def __init__(self, server: uvicorn.Server, use: UseRecorder, folder: Path, port: int,
                 idle_seconds: float, check_seconds: float) -> None:
        self.server, self.use, self.folder, self.port = server, use, folder, port
        self.idle_limit, self.check_seconds = idle_seconds, check_seconds
        self._lock: int | None = None
        self.reason: str | None = None

    def reason_to_stop(self) -> str | None:
        if not self._named():
            return (f"{self.folder / STATE_FILE} no longer names this server (pid {os.getpid()}, port "
                    f"{self.port}): its workspace was removed or now has another server")
        idle = self.use.idle_seconds()
        if idle >= self.idle_limit:
            return f"no API request for {idle:.0f} s (idle limit {self.idle_limit:g} s, [prefect] idle_minutes)"
        return None

    def _named(self) -> bool:
        state = read_state(self.folder.parent)
        return state is not None and (state.pid, state.port) == (os.getpid(), self.port)

    def run(self) -> None:
        while not self.server.should_exit:
            time.sleep(self.check_seconds)
            if self.reason_to_stop() is None:
                continue
            self._take_lock()
            self.reason = self.reason_to_stop()  # again: a command may have used it while this waited for the lock
            if self.reason is not None:
                log.info("stopping: %s", self.reason)
                if self._named():
                    (self.folder / STATE_FILE).unlink(missing_ok=True)  # commands find no server, start one
                self.server.should_exit = True
            elif self._lock is not None:
                os.close(self._lock)
                self._lock = None

    def _take_lock(self) -> None:
        """The workspace's lock, kept until the process ends once the server stops; none without a folder
        (opening it must not create the folder again)."""
        try:
            self._lock = os.open(self.folder / LOCK_FILE, os.O_RDWR)
        except OSError:
            return
        fcntl.flock(self._lock, fcntl.LOCK_EX)


def _load(factory: str) -> ASGIApp:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("factory", help="module:function building the ASGI app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-seconds", type=float, required=True)
    parser.add_argument("--check-seconds", type=float, required=True)
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)  # the server's log: its stderr is server.log
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", LOG_TIME_FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    folder = Path.cwd()
    use = UseRecorder(_load(args.factory))
    server = uvicorn.Server(uvicorn.Config(use, host="127.0.0.1", port=args.port, log_level="error",
                                           lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))
    watchdog = Watchdog(server, use, folder, args.port, args.idle_seconds, args.check_seconds)
    threading.Thread(target=watchdog.run, name="idle-watchdog", daemon=True).start()
    log.info("serving the Prefect API on port %d (pid %d); stops after %g s without a request, or when %s "
             "no longer names it", args.port, os.getpid(), args.idle_seconds, folder / STATE_FILE)
    server.run()
    log.info("stopped")  # after a signal uvicorn ends the process with it: the sender logs why (`prefect_server`)


if __name__ == "__main__":
    main()
