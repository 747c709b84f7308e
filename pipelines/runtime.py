"""Process set-up that must happen before Prefect, MLflow or GX are imported.

Keeps each workspace's orchestration state inside `SCFRISK_HOME` and turns third-party telemetry off.
A value the user already set in the environment always wins.
"""

from __future__ import annotations

import logging
import os

from core.settings import Settings

QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # The temporary server needs ~13 s on an idle 2-core machine; Prefect's 20 s default is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def prepare_environment(settings: Settings) -> None:
    """Point Prefect's local state at the workspace and silence telemetry (no-op for keys already set)."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str(settings.home_dir / "prefect"))
    settings.home_dir.mkdir(parents=True, exist_ok=True)


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "httpx", "urllib3", "great_expectations", "mlflow", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
