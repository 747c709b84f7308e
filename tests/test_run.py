"""What makes `scfrisk run` retrain: the training fingerprint covers data, definitions, settings and code."""

from __future__ import annotations

import shutil

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
