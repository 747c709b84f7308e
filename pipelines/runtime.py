"""Process set-up and ending of a command: what happens before Prefect, MLflow or GX are imported, and
after the command's work is done.

Keeps each workspace's orchestration state inside `SCFRISK_HOME` and turns third-party telemetry off.
A value the user already set (in the environment, or a Prefect setting in a profile) always wins.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from core.errors import ScfriskError
from core.settings import Settings
from core.sql import is_out_of_memory

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment
from pipelines.prefect_server import prefect_home, user_api_url

QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # Flow commands use the workspace's server (`pipelines.prefect_server`) or the user's: a temporary
    # server per command would cost 13-35 s and outlive a killed command.
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # MLflow 3 reads DO_NOT_TRACK only when it is "true"; otherwise each command that imports it starts a
    # telemetry client (threads, a config fetch, a record per API call) sending usage events.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def prepare_environment(settings: Settings) -> None:
    """Point Prefect's local state at the workspace and silence telemetry (no-op for keys already set)."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if user_api_url() is None:
        os.environ.setdefault("PREFECT_HOME", str(prefect_home(settings.home_dir)))
    settings.home_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def without_heartbeats() -> Iterator[None]:
    """Flow runs inside send no heartbeats, unless the user set a heartbeat frequency.

    Prefect 3.9 sends a flow run's heartbeat events from a thread that it joins when the run ends: up to 1 s
    more per flow command (the thread sleeps in 1 s steps), plus the events client the first heartbeat
    starts. Heartbeats only serve an automation that marks silent runs as crashed, which the workspace's
    server does not have; the flow run and its states are recorded the same.
    """
    from prefect.settings import get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


class QuickExit:
    """Ends the process as `sys.exit` does, minus the interpreter's teardown.

    After a flow command, Python frees the ~4,000 modules Prefect, MLflow, LightGBM and matplotlib brought
    before the process ends (1.7 CPU s after `scfrisk limits`, measured at load 13), state nobody reads
    again. Python's orderly shutdown still runs: threads are joined, then the atexit handlers (Prefect
    sends its last logs); this object's handler, registered before the libraries' and so run after them
    (last in, first out), then flushes logging and the standard streams and ends the process. Create it
    first thing in the process's entry point and only there: in a host process (pytest) it would end the
    host. After an uncaught exception (no `exit` call) Python exits as usual.
    """

    def __init__(self) -> None:
        self._code: int | None = None
        atexit.register(self._end)

    def exit(self, code: int) -> NoReturn:
        self._code = code
        sys.exit(code)

    def _end(self) -> None:
        if self._code is None:
            return
        logging.shutdown()  # its own atexit handler was registered before this one: it would not run
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more to write
                pass
        os._exit(self._code)


_program = False
"""Whether this process is the `scfrisk` program (`start_program`), not a host (pytest) running its commands."""


def start_program() -> QuickExit:
    """Process set-up of the `scfrisk` program, first thing in its entry point: the quick exit, and code
    loaded under `loading` frozen out of garbage collection."""
    global _program
    _program = True
    return QuickExit()


@contextmanager
def loading() -> Iterator[None]:
    """Imports of a command's libraries without garbage collection; their objects are then frozen out of
    later collections.

    What a flow command imports (Prefect, MLflow, LightGBM, matplotlib: ~700,000 objects) lives as long as
    the process, yet each full collection during the imports walked every object loaded so far: 7 of them,
    about a fifth of the import CPU. Collections resume after loading; `gc.freeze()` keeps the loaded
    objects out of them. Only in the program: in a host process the host's own objects would be frozen
    too, and never collected.
    """
    if not _program or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


class UserErrorsOnce(logging.Filter):
    """Keeps bad input raised inside a flow to the one line the CLI prints.

    Prefect logs a failing flow's exception with its traceback, then "Finished in state Failed(...)"
    repeating the message, for the flow and each parent flow. For a `ScfriskError` both are noise on the
    console (the Prefect API still records them): drop them there, keep every other failure as it is. DuckDB
    running out of memory outside a stage's partitions is one line too (the CLI's `core.sql.out_of_memory`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._runs: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        run = str(getattr(record, "flow_run_id", None) or getattr(record, "task_run_id", ""))
        if record.exc_info and (isinstance(record.exc_info[1], ScfriskError) or is_out_of_memory(record.exc_info[1])):
            self._runs.add(run)
            return False
        return not (run in self._runs and str(record.msg).startswith("Finished in state Failed"))


def configure_logging(verbose: bool = False) -> None:
    """Console logging of the CLI, unless the host process (pytest) already set logging up."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(UserErrorsOnce())
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("alembic", "httpx", "urllib3", "great_expectations", "mlflow", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def scheduled(flow: Flow[Any, Any], name: str, settings: Settings, source: Path, cron: str,
              example: str) -> RunnerDeployment:
    """A flow reading `source` as a Prefect deployment on a cron schedule, with this workspace's settings
    baked in (served by `scfrisk schedule`); a bad cron expression is one line, with `example`."""
    from pydantic import ValidationError

    try:
        return flow.to_deployment(
            name=name, cron=cron,
            parameters={"settings": settings.model_dump(mode="json"), "source": str(Path(source).resolve())},
        )
    except ValidationError:
        raise ScfriskError(f"schedule: '{cron}' is not a valid cron expression (e.g. '{example}')") from None
