"""Shared fixtures: an isolated workspace per test, one real Prefect server, PostgreSQL cluster and S3-compatible
server (moto's) per test session, and one `scfrisk run` on the sample that the end-to-end and dask engine tests
both read."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.runtime import QUIET_DEFAULTS

for key, value in QUIET_DEFAULTS.items():  # before Prefect, MLflow or GX are imported, as the CLI does
    os.environ.setdefault(key, value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from core.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_samples" / "platform"


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (starting one costs ~13 s), also exported as
    PREFECT_API_URL: the CLI then uses it as a user's own server, and starts none of its workspace's."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield PREFECT_API_URL.value()
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For pytest-xdist's `--dist loadgroup` (`make test` on 4 or more cores): a module's tests run on one
    worker, so its module fixtures are built once, and the modules of the session's sample run (`sample_run`)
    share one, so it is built once."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    shared = {item.module.__name__ for item in items if "sample_run" in getattr(item, "fixturenames", ())}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("sample_run" if module in shared else module))


@contextmanager
def captured_log(name: str) -> Iterator[list[str]]:
    """The messages logger `name` logs at INFO and above inside the block, as they come."""
    handler, logger = _Capture(), logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory, prefect_server):
    """`scfrisk run` on data_samples/ with the repository's own configuration and policy, as a real Prefect
    flow (ingest, features, training, limits, publish), once per session: (settings, summary, what
    `pipelines.compute` logged). The end-to-end tests check it and run it again; the dask engine tests compare
    their cluster's work with its raw store, which nothing after the run changes (the reruns load nothing new
    and the failing one commits nothing)."""
    from core.settings import load_settings
    from pipelines.run import run_flow

    repository = load_settings(REPO / "scfrisk.toml")
    settings = repository.model_copy(update={"home": tmp_path_factory.mktemp("sample_run") / "home",
                                             "policy_file": REPO / "policy.toml"})
    with captured_log("pipelines.compute") as log:
        summary = run_flow(settings=settings, source=str(SAMPLE), oracle=str(SAMPLE))
    return settings, summary, "\n".join(log)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings of a fresh workspace under the test's own temporary folder."""
    return Settings(home=tmp_path / "home")


@pytest.fixture(scope="session")
def trained():
    """The explanation tests' LightGBM model on catalogue-named features, trained once per session."""
    from testkit.explain import train

    return train()


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster for the session (`testkit.postgres`), removed at the end even when
    tests fail; skipped, saying why, only where no server binaries are installed."""
    from testkit.postgres import PostgresUnavailable, cluster, cluster_owner, server_bin

    try:
        server_bin(), cluster_owner()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    with cluster() as running:
        yield running


@pytest.fixture
def database(postgres, request: pytest.FixtureRequest) -> str:
    """The URL (password included) of a new empty database of the session's cluster, for one test."""
    import secrets

    name = "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40]
    return postgres.create_database(f"t_{secrets.token_hex(3)}_{name}")


@pytest.fixture(scope="session")
def s3_endpoint():
    """One local S3-compatible server for the session (`testkit.s3`): its endpoint URL."""
    from testkit.s3 import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, request: pytest.FixtureRequest) -> str:
    """A new empty bucket of the session's server; credentials and endpoint through the usual AWS variables,
    as on real S3."""
    import re
    import secrets

    import boto3

    for key, value in s3_endpoint.environment().items():
        monkeypatch.setenv(key, value)
    name = re.sub("[^a-z0-9]+", "-", f"{secrets.token_hex(3)}-{request.node.name.lower()}")[:60].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name
