"""What makes `scfrisk run` retrain: the training fingerprint covers data, definitions, settings and code."""

from __future__ import annotations

import shutil
import sys

import pytest

from core.settings import Settings
from pipelines.run import TRAINING_CODE, training_code_version, training_fingerprint
from tests.conftest import REPO


def test_code_version_follows_the_training_code_only(tmp_path):
    for part in TRAINING_CODE:
        source, target = REPO / part, tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "app.py").write_text("# the service\n")
    before = training_code_version(tmp_path)
    assert before == training_code_version(REPO), "same source, same version wherever it lives"

    (tmp_path / "serving" / "app.py").write_text("# the service, changed\n")
    assert training_code_version(tmp_path) == before, "a serving change does not retrain"

    training = tmp_path / "models" / "training.py"
    training.write_text(training.read_text() + "\n# a change to training\n")
    assert training_code_version(tmp_path) != before


def test_fingerprint_changes_with_each_input(tmp_path):
    settings = Settings(home=tmp_path, policy_file=REPO / "policy.toml")
    base = training_fingerprint(settings, "snap1", "fs1")
    assert base == training_fingerprint(settings, "snap1", "fs1")
    reseeded = settings.model_copy(update={"seed": 7})
    assert (
        len(
            {
                base,
                training_fingerprint(settings, "snap2", "fs1"),
                training_fingerprint(settings, "snap1", "fs2"),
                training_fingerprint(reseeded, "snap1", "fs1"),
            }
        )
        == 4
    )


RUN_MERCHANTS = 300
"""Enough merchants of the sample for a model to train, few enough for a quick run."""


@pytest.mark.slow
def test_run_from_the_platform_database_publishes_a_bundle_and_records_no_password(
    prefect_server, postgres, database, tmp_path, monkeypatch, capsys
):
    from prefect.client.orchestration import get_client

    from core.postgres import load
    from core.raw_store import RawStore
    from pipelines.cli import run
    from pipelines.ingest import ingest
    from tests.sample_slice import sample_slice, write_folder

    platform = sample_slice(RUN_MERCHANTS)
    load(database, {name: table.to_batches() for name, table in platform.items()})
    monkeypatch.chdir(REPO)  # the repository's policy.toml
    monkeypatch.setenv("SCFRISK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PGPASSWORD", "")  # the CLI moves the URL's password there; restored after the test
    # The source is what is tested here: one model candidate and one monthly snapshot, not the repository's 8 and 6.
    monkeypatch.setenv("SCFRISK_MODEL__SEARCH_TRIALS", "1")
    monkeypatch.setenv("SCFRISK_FEATURES__SNAPSHOT_MONTHS", "1")
    monkeypatch.setattr(sys, "argv", ["scfrisk", "run", "--source", database])
    run()
    assert "published bundle" in capsys.readouterr().out
    store = RawStore(tmp_path / "home" / "raw")
    assert store.source_state()["postgresql"]["watermarks"]["orders"]  # pulled through the database source
    from_files = ingest(write_folder(tmp_path / "batch", platform), Settings(home=tmp_path / "files"))
    assert store.snapshot_id == from_files.snapshot_id  # the same rows as the same tables from files
    url = database.replace(f":{postgres.password}@", "@")
    with get_client(sync_client=True) as client:
        sources = [r.parameters["source"] for r in client.read_flow_runs() if "source" in r.parameters]
    assert url in sources and not [s for s in sources if postgres.password in s]
