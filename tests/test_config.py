from pathlib import Path

import pytest

from core.settings import ConfigError, load_settings


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scfrisk.toml"
    path.write_text(text)
    return path


def test_defaults_keep_all_state_in_the_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "ws"))
    settings = load_settings(_write(tmp_path, ""))
    assert settings.home_dir == (tmp_path / "ws").resolve()
    assert settings.path("raw_store") == settings.home_dir / "raw"
    assert settings.tracking_uri == f"sqlite:///{settings.home_dir / 'mlflow.db'}"


def test_environment_overrides_file_for_every_level(tmp_path, monkeypatch):
    path = _write(tmp_path, 'home = "a"\n[mlflow]\nexperiment = "from-file"\n[model]\nmax_rounds = 100\n')
    monkeypatch.setenv("SCFRISK_MLFLOW__EXPERIMENT", "from-env")
    monkeypatch.setenv("SCFRISK_MODEL__MAX_ROUNDS", "70")
    settings = load_settings(path)
    assert settings.mlflow.experiment == "from-env"
    assert settings.model.max_rounds == 70
    assert settings.home_dir == (tmp_path / "a").resolve()


def test_relative_paths_in_the_file_are_read_from_its_folder(tmp_path, monkeypatch):
    """`scfrisk -c /srv/ws/scfrisk.toml` from another directory finds that workspace and its policy."""
    path = _write(tmp_path, 'home = ".ws"\npolicy_file = "policy.toml"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(path)
    assert settings.home_dir == (tmp_path / ".ws").resolve()
    assert settings.policy_file == tmp_path / "policy.toml"
    monkeypatch.setenv("SCFRISK_HOME", "from-env")
    assert load_settings(path).home_dir == (elsewhere / "from-env").resolve()  # the environment's: from here


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'paths.raw_stor'"):
        load_settings(_write(tmp_path, '[paths]\nraw_stor = "x"\n'))


def test_wrong_type_is_named_with_its_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.max_rounds'.*'abc'"):
        load_settings(_write(tmp_path, '[model]\nmax_rounds = "abc"\n'))


def test_wrong_type_from_environment_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SCFRISK_MODEL__TEST_MONTHS", "0")
    with pytest.raises(ConfigError, match=r"'model.test_months'"):
        load_settings(_write(tmp_path, ""))


def test_missing_and_malformed_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(_write(tmp_path, "[paths\n"))


def test_repository_config_is_valid():
    repo_config = Path(__file__).resolve().parents[1] / "scfrisk.toml"
    assert load_settings(repo_config).mlflow.registered_model == "scfrisk-pd"


def test_the_shipped_config_is_the_code_defaults(monkeypatch):
    """scfrisk.toml documents the defaults; a value that differs from the code's would be two sources."""
    import os
    import tomllib

    from core.settings import Settings

    def flat(values: dict, prefix: str = ""):
        for key, value in values.items():
            yield from flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    for key in [k for k in os.environ if k.startswith("SCFRISK_")]:
        monkeypatch.delenv(key)
    shipped = dict(flat(tomllib.loads((Path(__file__).resolve().parents[1] / "scfrisk.toml").read_text())))
    defaults = dict(flat(Settings().model_dump(mode="json")))
    assert {key: (value, defaults[key]) for key, value in shipped.items() if defaults[key] != value} == {}


def test_a_database_password_in_the_configuration_is_refused(tmp_path):
    path = tmp_path / "scfrisk.toml"
    path.write_text('[ingest]\nsource = "postgresql://risk:s3cret@db:5432/platform"\n')
    with pytest.raises(ConfigError, match=r"'ingest.source': a database password does not belong in the "
                                          r"configuration: put it in PGPASSWORD or ~/.pgpass") as error:
        load_settings(path)
    assert "s3cret" not in str(error.value)
    path.write_text('[ingest]\nsource = "postgresql://risk@db:5432/platform"\n')
    assert load_settings(path).ingest.source == "postgresql://risk@db:5432/platform"
