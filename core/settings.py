"""Workspace configuration: one `scfrisk.toml`, every key overridable from the environment.

All state of a run lives under one workspace folder, ``SCFRISK_HOME`` (default ``.scfrisk`` in the
current directory), so two workspaces never mix. Relative paths in the config are resolved against it.

Precedence, highest first: environment (``SCFRISK_<KEY>`` at the top level, ``SCFRISK_<SECTION>__<KEY>``
inside a section), then the TOML file, then the defaults below. The file is ``$SCFRISK_CONFIG`` when set,
else ``scfrisk.toml`` in the current directory when present, else none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from core.errors import ScfriskError, describe_invalid
from core.files import read_toml
from core.storage import S3_SCHEMES, check_location, is_local, local_path, scheme

CONFIG_ENV = "SCFRISK_CONFIG"
DEFAULT_CONFIG_FILE = "scfrisk.toml"


class ConfigError(ScfriskError):
    """A configuration file or variable that cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


STORES = ("raw_store", "feature_store")
"""The `[paths]` entries that may be object storage (`core.storage`): the data every worker reads."""

LOCAL_ONLY = {
    "home": "MLflow's SQLite file, Prefect's database and the limits tables are files on this machine",
    "policy_file": "the credit policy is read from this machine",
    "bundle_key_file": "the signing key is read from this machine",
    "reports": "reports are written with their files beside them and logged to MLflow from this machine",
    "published": "the service reads its bundles and their live pointer from a local folder (copy them to "
                 "the service's hosts)",
    "validation": "Great Expectations writes the validation page into a local folder",
    "mlflow_artifacts": "for artifacts on object storage run an MLflow server with --artifacts-destination "
                        "(docs/scaling.md) and set [mlflow].tracking_uri",
    "audit_log": "the service appends to its decision log with fsync on a local disk",
}
"""What stays a local path, and why: named in the error a URL there gets."""


def _local(key: str, value: Any) -> Any:
    """A local path; a URL is refused naming the entries that take one."""
    if isinstance(value, str) and "://" in value:
        raise ValueError(f"must be a local path, not a URL: {LOCAL_ONLY[key]}; only [paths] "
                         f"{' and '.join(STORES)} may be object storage")
    return value


class PathsConfig(_Section):
    """Where each layer keeps its files, relative to the workspace unless absolute. The raw and feature
    stores may also be URLs (`s3://lake/raw`, `file:///srv/raw`, `gs://...`): see docs/storage.md."""

    raw_store: str = "raw"
    feature_store: str = "features"
    reports: Path = Path("reports")
    published: Path = Path("published")
    validation: Path = Path("validation")
    mlflow_artifacts: Path = Path("mlartifacts")

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        """Refused before the fields are parsed, so the message cannot quote the secret back."""
        for key in STORES:
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, str) and "://" in value and urlsplit(value).password:
                raise ValueError(f"{key}: credentials do not belong in a store's URL: set them in the environment "
                                 "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...)")
        return data

    @field_validator(*STORES, mode="before")
    @classmethod
    def _store(cls, value: Any) -> Any:
        return str(value) if isinstance(value, os.PathLike) else value

    @field_validator(*STORES)
    @classmethod
    def _reachable(cls, value: str) -> str:
        return check_location(value)

    @field_validator("reports", "published", "validation", "mlflow_artifacts", mode="before")
    @classmethod
    def _local_path(cls, value: Any, info: ValidationInfo) -> Any:
        return _local(info.field_name, value)


class StorageConfig(_Section):
    """Where an `s3://` store's service is: what is not a secret. Credentials come from the environment
    (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, an IAM role, a web identity), as boto and
    delta-rs read them, never from this file. Empty values leave the `AWS_*` variables in charge."""

    endpoint_url: str = ""
    """An S3-compatible service (MinIO, Ceph, R2: `https://minio.internal:9000`); empty: AWS S3."""
    region: str = ""
    allow_http: bool = False
    """Allow a plain-http `endpoint_url` (a test server on loopback); delta-rs refuses http without it."""

    @model_validator(mode="before")
    @classmethod
    def _no_secret(cls, data: Any) -> Any:
        """Refused before parsing, so the message cannot quote the secret back."""
        for key in data if isinstance(data, dict) else ():
            if any(word in str(key).lower() for word in ("secret", "password", "token", "key")):
                raise ValueError(f"{key}: credentials do not belong in the configuration: set AWS_ACCESS_KEY_ID "
                                 "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an IAM role) in the environment")
        endpoint = data.get("endpoint_url") if isinstance(data, dict) else None
        if isinstance(endpoint, str) and urlsplit(endpoint).password:
            raise ValueError("endpoint_url: credentials do not belong in the configuration: set them in the "
                             "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"'{value}' is not an http(s) endpoint such as https://minio.internal:9000")
        return value

    def options(self) -> dict[str, str]:
        """delta-rs's storage options of an S3 store (`core.storage` gives fsspec its own names of them)."""
        options = {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": self.region,
                   "AWS_ALLOW_HTTP": "true" if self.allow_http else ""}
        return {key: value for key, value in options.items() if value}


class MlflowConfig(_Section):
    """Tracking store; empty `tracking_uri` means an embedded SQLite file in the workspace."""

    tracking_uri: str = ""
    experiment: str = "scfrisk"
    registered_model: str = "scfrisk-pd"


class ModelConfig(_Section):
    """Training settings shared by the default-model flows (their seed is the workspace's `seed`)."""

    label_horizon_months: int = Field(12, ge=1, le=36)
    test_months: int = Field(2, ge=1)
    valid_months: int = Field(2, ge=1)
    max_rounds: int = Field(1000, ge=10, le=20000)
    search_trials: int = Field(8, ge=1, le=200)
    threads: int = Field(1, ge=1, le=256)


class FeaturesConfig(_Section):
    """Feature-store settings."""

    snapshot_months: int = Field(6, ge=0, le=240)
    """Monthly offline snapshots kept materialised (most recent months; each later run adds only the new one)."""


class GatesConfig(_Section):
    """What a challenger must show on the out-of-time test before it replaces the champion."""

    auc_tolerance: float = Field(0.005, ge=0.0, le=0.2)
    max_ece: float = Field(0.03, gt=0.0, le=0.5)
    max_score_psi: float = Field(0.25, gt=0.0, le=5.0)
    require_monotone_grades: bool = True
    min_grade_count: int = Field(30, ge=1)
    grade_tolerance_z: float = Field(1.64, ge=0.0, le=5.0)


class IngestConfig(_Section):
    """Rules of the validated ingestion that are settings rather than schema."""

    max_failure_examples: int = Field(5, ge=1, le=100)
    allow_future_seconds: int = Field(0, ge=0)
    data_docs_on_success: bool = False
    """Also write the validation page (`validation/index.html`) of a batch that passed; a rejected batch
    always gets it."""
    source: str = ""
    """What `scfrisk ingest` reads when given no `--source`: a batch folder, or the platform's database
    (`postgresql://user@host:5432/dbname`; its password goes in PGPASSWORD or ~/.pgpass, never here)."""
    watermark_overlap_seconds: int = Field(3600, ge=0)
    """How far before its watermark a database pull reads again, to catch rows that committed after the last
    pull with earlier change times: more than the platform's longest writing transaction (docs/storage.md)."""

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        """Refused before the field is parsed, so the message cannot quote the password back."""
        source = data.get("source") if isinstance(data, dict) else None
        if isinstance(source, str) and "://" in source and urlsplit(source).password:
            raise ValueError("source: a database password does not belong in the configuration: put it in "
                             "PGPASSWORD or ~/.pgpass (libpq reads both), and the URL without it here")
        return data


MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$")
"""A size as Dask reads it (`4GiB`, `512MB`, `2e9` is not one: plain bytes are digits only)."""


class ComputeConfig(_Section):
    """The engine that runs per-partition work (`pipelines.compute`): one process, or a Dask cluster."""

    engine: Literal["local", "dask"] = "local"
    """`local`: a loop in the flow's process (no scheduler, fastest on one machine); `dask`: Prefect tasks on
    prefect-dask's DaskTaskRunner, on the scheduler at `address` or a LocalCluster started for the flow run."""
    address: str = ""
    """An existing Dask scheduler (`tcp://host:8786`); empty: a LocalCluster of `n_workers` per flow run."""
    n_workers: int = Field(2, ge=1, le=1024)
    threads_per_worker: int = Field(1, ge=1, le=256)
    memory_limit: str = "4GiB"
    """Memory of each LocalCluster worker (Dask pauses, then restarts, a worker beyond it)."""
    merchant_buckets: int = Field(8, ge=1, le=4096)
    """Merchant hash buckets of a new raw store's layout (`core.partitioning`); an existing store keeps its own."""
    train_in_memory_rows: int = Field(2_000_000, ge=1)
    """Training sets with more rows train data-parallel on the cluster (`models.distributed`): 2M rows of ~80
    float64 features are ~1.3 GB as a frame plus LightGBM's binned copy, well inside one 4 GiB worker or the
    flow's process."""

    @field_validator("address")
    @classmethod
    def _scheduler_url(cls, value: str) -> str:
        if value and "://" not in value:
            raise ValueError(f"'{value}' is not a scheduler address such as tcp://host:8786")
        return value

    @field_validator("memory_limit")
    @classmethod
    def _size(cls, value: str) -> str:
        if not MEMORY.match(value.strip()):
            raise ValueError(f"'{value}' is not a size such as 4GiB or 512MB")
        return value.strip()


class RetentionConfig(_Section):
    """What `scfrisk vacuum` keeps (`pipelines.retention`): everything of the last `days` days, and whatever
    is still needed however old (the latest snapshot, a registered model's training data, the live bundle,
    the bundles logged decisions were made with, the audit log)."""

    days: int = Field(30, ge=1, le=36_500)
    """Days of history kept whole. At least one: a file younger than that may belong to a run in progress
    (an ingest staging its partitions, a refresh writing its features), which a vacuum must not take."""


class ServiceConfig(_Section):
    """The scoring service. API keys are `key` (every scope) or `key:scope+scope` (scopes: score, read);
    keys from the comma-separated `SCFRISK_API_KEYS` variable are added to these."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: tuple[SecretStr, ...] = ()
    """Secret: every flow takes the settings as a parameter, and Prefect records parameters in its database
    and UI, where a `SecretStr` shows as `**********`."""
    max_batch_size: int = Field(500, ge=1, le=100_000)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    max_missing_share: float = Field(0.5, ge=0.0, le=1.0)
    """Largest share of the model's inputs a `features` payload may leave unknown (null, a missing-value
    code, an unseen category) before it is refused with 422: a PD built on next to nothing is not a
    decision. 0.5 keeps every merchant of the sample's online store scorable (the least known has 37 of
    80 inputs unknown, 99% have at most 23) and refuses payloads of mostly nulls."""
    max_records: int = Field(5_000, ge=1, le=1_000_000)
    """Raw records one request may carry, all tables together (their features are computed per request)."""
    audit_log: Path = Path("audit/decisions.jsonl")
    reload_interval_seconds: float = Field(2.0, gt=0.0)

    @field_validator("audit_log", mode="before")
    @classmethod
    def _local_log(cls, value: Any) -> Any:
        return _local("audit_log", value)


class PrefectConfig(_Section):
    """The workspace's Prefect server (`pipelines.prefect_server`), which flow commands start and reuse."""

    idle_minutes: float = Field(60.0, gt=0.0)
    """It stops after this long without an API request (a running command pings it, so never under one).
    An hour spans the pauses of a working session (reading a report, editing the policy) so that commands
    keep finding it, while a server left by a session, a demo or a test run ends the same hour: each holds
    about 250 MB, and starting one again costs 3 to 13 s. A running server keeps the value it started with."""
    check_seconds: float = Field(15.0, gt=0.0)
    """How often it checks its idle time and its folder: it stops within this long of its idle limit, or of
    its workspace's removal."""


class Settings(BaseSettings):
    """The validated configuration of one workspace."""

    model_config = SettingsConfigDict(
        env_prefix="SCFRISK_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    home: Path = Path(".scfrisk")
    seed: int = 42
    """The one seed of a workspace: splits, model search, boosting, samples in reports."""
    policy_file: Path = Path("policy.toml")
    bundle_key_file: Path | None = None
    """Absolute path, outside the workspace, of the key that signs bundle manifests (`serving.signing`);
    `SCFRISK_BUNDLE_KEY` takes precedence. Neither set: bundles are not signed."""
    paths: PathsConfig = PathsConfig()
    storage: StorageConfig = StorageConfig()
    mlflow: MlflowConfig = MlflowConfig()
    model: ModelConfig = ModelConfig()
    features: FeaturesConfig = FeaturesConfig()
    gates: GatesConfig = GatesConfig()
    ingest: IngestConfig = IngestConfig()
    compute: ComputeConfig = ComputeConfig()
    retention: RetentionConfig = RetentionConfig()
    service: ServiceConfig = ServiceConfig()
    prefect: PrefectConfig = PrefectConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return env_settings, init_settings

    @field_validator("home", "policy_file", "bundle_key_file", mode="before")
    @classmethod
    def _local_file(cls, value: Any, info: ValidationInfo) -> Any:
        return _local(info.field_name, value)

    def path(self, key: str) -> Path:
        """Absolute local path of a `[paths]` entry, resolved against the workspace. A store on object
        storage has none: open it with `store_url` (`RawStore.from_settings`, `OfflineStore.from_settings`)."""
        value = getattr(self.paths, key)
        if not is_local(value):
            raise ConfigError(f"[paths] {key} is {value}, not a local folder; this step needs one")
        value = local_path(value)
        return value if value.is_absolute() else self.home_dir / value

    def store_url(self, key: str) -> str:
        """Where a store of `STORES` is: its URL on object storage, else its absolute local path."""
        if key not in STORES:
            raise ValueError(f"{key} is not one of the stores {STORES}")
        value = getattr(self.paths, key)
        return value if not is_local(value) else str(self.path(key))

    def storage_options(self, key: str) -> dict[str, str]:
        """delta-rs's options for a store of `STORES`: the `[storage]` table's for an S3 store, else none."""
        return self.storage.options() if scheme(self.store_url(key)) in S3_SCHEMES else {}

    @property
    def audit_log(self) -> Path:
        """Absolute path of the service's append-only decision log, resolved against the workspace."""
        value = self.service.audit_log
        return value if value.is_absolute() else self.home_dir / value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{self.home_dir / 'mlflow.db'}"


def _anchored(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The file's relative `home` and `policy_file` read from the file's own folder, not from wherever the
    command runs: `scfrisk -c /srv/ws/scfrisk.toml` works from any directory."""
    anchored = dict(data)
    for key in ("home", "policy_file"):
        value = data.get(key)
        if isinstance(value, str) and "://" not in value and not Path(value).expanduser().is_absolute():
            anchored[key] = str(folder / value)
    return anchored


def load_settings(config_file: Path | str | None = None) -> Settings:
    """Read, merge and validate the configuration; raise `ConfigError` naming every bad key."""
    if config_file is None:
        config_file = os.environ.get(CONFIG_ENV) or (
            DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).is_file() else None
        )
    data: dict[str, Any] = {}
    source = "defaults"
    if config_file is not None:
        source = str(config_file)
        data = read_toml(config_file, ConfigError, "config file")
        data = _anchored(data, Path(config_file).resolve().parent)
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = describe_invalid(exc.errors())
        raise ConfigError(f"invalid configuration ({source} + SCFRISK_* environment): {problems}") from exc
