"""Process set-up that must happen before Prefect, MLflow or GX are imported.

Keeps each workspace's orchestration state inside `SCFRISK_HOME` and turns third-party telemetry off.
A value the user already set in the environment always wins.
"""

from __future__ import annotations

import logging
import os

from core.errors import ScfriskError
from core.settings import Settings
from pipelines.prefect_server import prefect_home, user_api_url

QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # Flow commands use the workspace's server (`pipelines.prefect_server`) or the user's: a temporary
    # server per command would cost 13-35 s and outlive a killed command.
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    "DO_NOT_TRACK": "1",
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


class UserErrorsOnce(logging.Filter):
    """Keeps bad input raised inside a flow to the one line the CLI prints.

    Prefect logs a failing flow's exception with its traceback, then "Finished in state Failed(...)"
    repeating the message, for the flow and each parent flow. For a `ScfriskError` both are noise on the
    console (the Prefect API still records them): drop them there, keep every other failure as it is.
    """

    def __init__(self) -> None:
        super().__init__()
        self._runs: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        run = str(getattr(record, "flow_run_id", None) or getattr(record, "task_run_id", ""))
        if record.exc_info and isinstance(record.exc_info[1], ScfriskError):
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
