"""The workspace's Prefect API server: started by the first flow command, reused by the later ones.

Every flow run is recorded in a Prefect API. Without `PREFECT_API_URL`, Prefect would start a temporary
server inside each command (13 to 35 s on a 2-core machine), and a command killed with `kill -9` would
leave it running. Instead one server per workspace runs detached from the command that started it: its
database under `SCFRISK_HOME/prefect`, its pid and port in `server.json` there (written as soon as it is
spawned, so even a command killed during the start leaves a server that `scfrisk server stop` finds).
Later commands check that it answers and reuse it. A `PREFECT_API_URL` the user set always wins: then
scfrisk neither starts nor manages a server.

Nothing but `scfrisk server stop` would stop it, and workspaces are often thrown away (tests, demos, a
temporary home): the server runs `pipelines.prefect_server_process`, which stops it after `[prefect]
idle_minutes` without an API request, or soon after its folder is removed. A command keeps it alive for as
long as the command runs, however long its flow goes without an API call: `ensure_server` starts a daemon
thread pinging `/api/health` four times per idle period. A server started by an older scfrisk, which would
never stop, is restarted like one of another install.

Standard library only: this runs before Prefect is imported, and `PREFECT_API_URL` must be set by then.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ScfriskError

if TYPE_CHECKING:
    from core.settings import PrefectConfig

log = logging.getLogger(__name__)

API_URL_VARIABLE = "PREFECT_API_URL"
STATE_FILE = "server.json"
LOG_FILE = "server.log"
LOCK_FILE = "server.lock"
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
APP_FACTORY = "prefect.server.api.server:create_app"
SERVER_MODULE = "pipelines.prefect_server_process"
PINGS_PER_IDLE_PERIOD = 4
"""A command's pings: enough that one lost or slow ping never lets the server reach its idle limit."""
_KEPT_ALIVE: set[ServerState] = set()
"""The servers this process pings (`_keep_alive`)."""
STARTUP_TIMEOUT_SECONDS = 180.0
"""Idle, the server answers after ~10 s on a 2-core machine; under a load of 4 it has taken 35 s."""
STOP_TIMEOUT_SECONDS = 15.0
SERVER_ENVIRONMENT = {
    # Prefect's own temporary server runs this way: API only, no UI, no scheduling services.
    "PREFECT_UI_ENABLED": "false",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


@dataclass(frozen=True)
class ServerState:
    """What `server.json` records about the workspace's server."""

    pid: int
    port: int
    python: str
    prefect: str
    started_at: str
    idle_minutes: float | None = None
    """None: started by an older scfrisk, without the idle stop."""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def describe(self) -> str:
        idle = (f"stops after {self.idle_minutes:g} min without use" if self.idle_minutes is not None
                else "never stops by itself (started by an older scfrisk)")
        return f"pid {self.pid}, {self.api_url}, started {self.started_at}, {idle}"


def prefect_home(home: Path) -> Path:
    """Prefect's own state (database, profiles) for the workspace `home`."""
    return home / "prefect"


def user_api_url() -> str | None:
    """The Prefect API the user chose, if any: it wins over the workspace's server."""
    return os.environ.get(API_URL_VARIABLE) or None


def read_state(home: Path) -> ServerState | None:
    path = prefect_home(home) / STATE_FILE
    try:
        return ServerState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_running(state: ServerState, home: Path) -> bool:
    """The recorded pid is alive and is this workspace's Prefect server (not a process that reused the pid,
    nor the server of a workspace this one was copied from)."""
    proc = Path(f"/proc/{state.pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return False
    return (APP_FACTORY.encode() in cmdline and str(state.port).encode() in cmdline
            and Path(cwd) == prefect_home(home).resolve())


def is_healthy(state: ServerState, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{state.api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ensure_server(home: Path, config: PrefectConfig) -> str:
    """Point this process (and its children) at the workspace's server, starting it if needed, and keep
    it alive while this process runs. A server already running keeps the idle time it was started with."""
    chosen = user_api_url()
    if chosen:
        return chosen
    with _locked(home):
        state = read_state(home)
        if state is not None and is_running(state, home) and not _same_install(state):
            log.info("the workspace's Prefect server (pid %d, %s) runs another install: restarting it",
                     state.pid, state.api_url)
            _terminate(state, home, "a command of another install (or of a newer scfrisk: this one would never "
                                    "stop by itself) restarts it")
            state = None
        started = None
        if state is None or not is_running(state, home):
            state, started = _start(home, config)
            log.info("started the workspace's Prefect server (%s); later commands reuse it, "
                     "`scfrisk server stop` stops it", state.describe())
        _wait_until_healthy(state, home, started)
    if state not in _KEPT_ALIVE:  # once per process: a notebook may run many commands
        _KEPT_ALIVE.add(state)
        every = (state.idle_minutes or config.idle_minutes) * 60 / PINGS_PER_IDLE_PERIOD
        threading.Thread(target=_keep_alive, args=(state, home, every), name="prefect-keepalive",
                         daemon=True).start()
    os.environ[API_URL_VARIABLE] = state.api_url
    return state.api_url


def stop_server(home: Path) -> ServerState | None:
    """Stop the workspace's server; the state of the one stopped, or None when none was running."""
    with _locked(home):
        state = read_state(home)
        (prefect_home(home) / STATE_FILE).unlink(missing_ok=True)
        if state is None or not is_running(state, home):
            return None
        _terminate(state, home, "on request (`scfrisk server stop`)")
        return state


def _same_install(state: ServerState) -> bool:
    return (state.python == sys.executable and state.prefect == version("prefect")
            and state.idle_minutes is not None)


def _keep_alive(state: ServerState, home: Path, every: float) -> None:
    """Ping the server every `every` seconds while this process runs; stop when the workspace no longer
    runs it."""
    while True:
        time.sleep(every)
        if read_state(home) != state or not is_running(state, home):
            _KEPT_ALIVE.discard(state)
            return
        is_healthy(state)


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One command at a time checks, starts or stops the server (two concurrent commands share one)."""
    folder = prefect_home(home)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(home: Path, config: PrefectConfig) -> tuple[ServerState, subprocess.Popen]:
    folder = prefect_home(home)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != API_URL_VARIABLE}
    env.update(SERVER_ENVIRONMENT, PREFECT_HOME=str(folder))
    command = [sys.executable, "-m", SERVER_MODULE, APP_FACTORY, "--port", str(port),
               "--idle-seconds", str(config.idle_minutes * 60), "--check-seconds", str(config.check_seconds)]
    with (folder / LOG_FILE).open("ab") as server_log:
        # Its own session: neither a Ctrl-C in the terminal nor the end of this command stops it.
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=server_log,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    state = ServerState(pid=process.pid, port=port, python=sys.executable, prefect=version("prefect"),
                        started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                        idle_minutes=config.idle_minutes)
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return state, process


def _wait_until_healthy(state: ServerState, home: Path, started: subprocess.Popen | None) -> None:
    """Wait for the API to answer; give up when the server ends (the one just started is watched through
    its process: its /proc entry is empty for a moment while it starts) or after the timeout."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not is_healthy(state):
        ended = started.poll() is not None if started is not None else not is_running(state, home)
        if ended or time.monotonic() > deadline:
            _terminate(state, home, f"did not answer within {STARTUP_TIMEOUT_SECONDS:.0f} s")
            (prefect_home(home) / STATE_FILE).unlink(missing_ok=True)
            tail = _log_tail(prefect_home(home) / LOG_FILE)
            raise ScfriskError(f"the workspace's Prefect server ({state.describe()}) did not answer within "
                               f"{STARTUP_TIMEOUT_SECONDS:.0f} s; its log ends: {tail}")
        time.sleep(0.2)


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


def _terminate(state: ServerState, home: Path, reason: str) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not ended in time; its log says why."""
    if not is_running(state, home):
        return
    with suppress(OSError), (prefect_home(home) / LOG_FILE).open("a") as server_log:
        server_log.write(f"{time.strftime(LOG_TIME_FORMAT)} stopping: {reason} (signal from pid {os.getpid()})\n")
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_SECONDS), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(state.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while is_running(state, home) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not is_running(state, home):
            return
