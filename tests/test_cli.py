"""The command line's first seconds: inputs refused before heavy imports, one line per error, literal help
texts, and a stage refused up front when the workspace lacks the raw tables it needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from core.errors import ScfriskError
from core.raw_store import RawStore
from core.schemas import STAGE_TABLES
from core.settings import ModelConfig, Settings
from pipelines.cli import app, run
from simulator import SimulationConfig, months_to_train, simulate_platform
from tests.batch_builder import valid_batch, write_batch
from tests.conftest import REPO

HEAVY = ("prefect", "great_expectations", "mlflow", "pandas", "pyarrow", "duckdb", "lightgbm")


def _cli(argv: list[str], monkeypatch, capsys, home: Path) -> tuple[int, str]:
    """`scfrisk argv` in this process through the console entry point: exit code and stderr."""
    monkeypatch.setenv("SCFRISK_HOME", str(home))
    monkeypatch.setattr(sys, "argv", ["scfrisk", *argv])
    with pytest.raises(SystemExit) as exit_:
        run()
    return exit_.value.code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_missing_batch_folder_is_refused_before_any_heavy_import(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipelines.cli", "ingest", "--source", str(tmp_path / "nope")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "SCFRISK_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 2
    error = _one_error_line(proc.stderr)
    assert "'--source'" in error and "does not exist" in error
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), f"imported before refusing: {sorted(imported & set(HEAVY))}"


def test_a_usage_error_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    code, stderr = _cli(["ingest", "--sauce", "x"], monkeypatch, capsys, tmp_path / "home")
    assert code == 2
    assert "No such option: --sauce" in _one_error_line(stderr)


def _commands(group: typer.main.TyperGroup, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_help_text_prints_as_written():
    """Brackets such as `[service]` are text, not Rich markup to swallow."""
    texts = 0
    for path, command in _commands(typer.main.get_command(app)):
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.split())
        for text in [command.help or "", *(p.help or "" for p in command.params)]:
            for phrase in re.findall(r"[^.;]*\[[^\]]*\][^.;]*", text):
                texts += 1
                assert " ".join(phrase.split()) in shown, f"scfrisk {' '.join(path)} --help: {phrase!r}"
    assert texts >= 3
    serve = " ".join(CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output.split())
    assert "SCFRISK_API_KEYS or [service])" in serve and "(default: [service].host)" in serve


def test_simulate_refuses_a_history_too_short_to_train_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "platform"
    code, stderr = _cli(["simulate", "--months", "19", "--out", str(out)], monkeypatch, capsys, tmp_path / "home")
    assert code == 2
    assert "--months 19 is too short to train on" in _one_error_line(stderr) and "at least 20 months" in stderr
    assert not out.exists()
    monkeypatch.setenv("SCFRISK_MODEL__LABEL_HORIZON_MONTHS", "6")  # the minimum follows the model settings
    code, stderr = _cli(["simulate", "--months", "13", "--out", str(out)], monkeypatch, capsys, tmp_path / "home")
    assert code == 2 and "at least 14 months" in _one_error_line(stderr)


def test_simulate_refuses_more_days_than_the_window_has(tmp_path, monkeypatch, capsys):
    out = tmp_path / "platform"
    args = ["simulate", "--months", "20", "--merchants", "10", "--days", "700", "--out", str(out)]
    code, stderr = _cli(args, monkeypatch, capsys, tmp_path / "home")
    assert code == 2
    assert "days must be between 1 and 608 (the window has 609 days), got 700" in _one_error_line(stderr)
    assert not out.exists()


@pytest.mark.slow
def test_months_to_train_is_the_shortest_simulation_that_splits(tmp_path):
    """At the minimum the out-of-time split has its three slices; one month less, training fails."""
    from core.sources import FolderSource, read_table
    from features.offline_store import training_frame
    from models.splits import time_split

    model = ModelConfig(label_horizon_months=2, valid_months=1, test_months=1)
    needed = months_to_train(model)
    for months in (needed, needed - 1):
        folder = tmp_path / str(months)
        simulate_platform(SimulationConfig(n_merchants=120, months=months, seed=1), folder / "batch")
        settings = Settings(home=folder / "home", model=model)
        store = RawStore(settings.path("raw_store"))
        with store.transaction() as staging:  # the simulator's tables are valid: skip GX to keep this short
            batch = FolderSource(folder / "batch")
            for name in batch.tables():
                staging.stage(name, read_table(batch, name))
            staging.commit()
        if months == needed:
            frame = training_frame(settings)
            assert set(time_split(frame["as_of"], model.valid_months, model.test_months)) == {
                "train", "valid", "test"}
        else:
            with pytest.raises(ScfriskError):
                time_split(training_frame(settings)["as_of"], model.valid_months, model.test_months)


def test_run_refuses_a_batch_without_loan_performance_at_once(tmp_path, monkeypatch, capsys):
    batch = {name: frame for name, frame in valid_batch().items() if name != "loan_performance"}
    folder = write_batch(tmp_path / "batch", batch)
    home = tmp_path / "home"
    code, stderr = _cli(["run", "--source", str(folder)], monkeypatch, capsys, home)
    assert code == 2
    error = _one_error_line(stderr)
    assert f"run needs raw tables {', '.join(STAGE_TABLES['run'])}" in error
    assert f"neither batch {folder} nor raw store {home / 'raw'} has loan_performance" in error
    assert not (home / "raw").exists() and not (home / "prefect" / "server.json").exists()


@pytest.mark.parametrize("stage", ["train", "limits", "features", "monitor"])
def test_a_stage_names_the_raw_tables_the_workspace_lacks(stage, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    store = RawStore(home / "raw")
    with store.transaction() as staging:
        staging.stage("merchants", pq.read_table(write_batch(tmp_path / "b", valid_batch()) / "merchants.parquet"))
        staging.commit()
    argv = {"train": ["train"], "limits": ["limits"], "features": ["features", "build"], "monitor": ["monitor"]}[stage]
    code, stderr = _cli(argv, monkeypatch, capsys, home)
    assert code == 2
    lacking = [t for t in STAGE_TABLES[stage] if t != "merchants"]
    assert f"raw store {home / 'raw'} has no {', '.join(lacking)}: ingest" in _one_error_line(stderr)
    assert not (home / "prefect" / "server.json").exists()


@pytest.mark.slow
def test_a_wrong_target_is_one_line_without_traceback(prefect_server, tmp_path):
    """Bad input found inside a flow: Prefect's traceback and 'Finished in state Failed' stay off the
    console, the CLI's line is the only one."""
    table = REPO / "data_samples" / "public" / "german_credit.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--table", str(table), "--target", "nope"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "SCFRISK_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server},
    )
    assert proc.returncode == 2
    assert "target column 'nope' is not in" in _one_error_line(proc.stderr)
    assert sum("target column 'nope'" in line for line in proc.stderr.splitlines()) == 1, proc.stderr


def test_scoring_a_saved_model_imports_no_scikit_learn(tmp_path, trained):
    """`scfrisk limits` only scores: scikit-learn and SciPy's statistics (LightGBM's estimators, fitting
    calibrators, stratified splits) would add ~0.5 s of imports to the command."""
    model = trained.model.save(tmp_path / "model")
    rows = tmp_path / "rows.parquet"
    trained.frame.to_parquet(rows)
    code = f"""
import sys
import pandas as pd
import credit.strategy, features.offline_store, models.registry, pipelines.limits, reporting.strategy_report
from models.pd_model import PDModel
from models.splits import time_split
frame = pd.read_parquet({str(rows)!r})
PDModel.load({str(model)!r}).predict_pd(frame)
time_split(frame["applied_at"], 1, 1)
print(sorted({{name.split(".")[0] for name in sys.modules}} & {{"sklearn", "shap"}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_entry_point_ends_after_the_atexit_handlers_with_the_commands_code(tmp_path):
    """`QuickExit` skips only the interpreter's teardown: handlers registered later (Prefect's last logs)
    run, buffered output and logging are flushed, and the exit code is the command's."""
    code = f"""
import atexit, logging, sys
from pipelines.runtime import QuickExit
quick = QuickExit()
logging.basicConfig(filename={str(tmp_path / "log.txt")!r}, level=logging.INFO)
atexit.register(lambda: print("a library's handler ran"))
print("the command's output")
logging.getLogger("x").info("logged")
quick.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["the command's output", "a library's handler ran"]
    assert "logged" in (tmp_path / "log.txt").read_text()


def test_the_program_loads_libraries_without_collections_then_freezes_them():
    """`runtime.loading`: no garbage collection while a command imports, the loaded objects frozen out of
    later ones; in a host process (pytest) it changes nothing, or the host's objects would never be freed."""
    code = """
import gc
from pipelines.runtime import loading, start_program
collections = []
gc.callbacks.append(lambda phase, info: phase == "stop" and collections.append(info["generation"]))
with loading():
    pass
print("host", gc.isenabled(), gc.get_freeze_count())
start_program()
with loading():
    loaded = [[[] for _ in range(100)] for _ in range(10_000)]  # a million containers: ~1,400 collections
    print("loading", gc.isenabled(), len(collections))
print("loaded", gc.isenabled(), gc.get_freeze_count() > 1_000_000)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.splitlines() == ["host True 0", "loading False 0", "loaded True True"], proc.stderr[-2000:]


@pytest.mark.parametrize("user_setting, seen", [(None, "None"), ("60", "60")])
def test_flow_runs_of_a_command_send_no_heartbeats_unless_the_user_set_them(user_setting, seen):
    code = """
from prefect.settings import get_current_settings
from pipelines.runtime import without_heartbeats
with without_heartbeats():
    print(get_current_settings().flows.heartbeat_frequency)
"""
    env = {k: v for k, v in os.environ.items() if "HEARTBEAT" not in k}
    if user_setting is not None:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = user_setting
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.stdout.strip() == seen, proc.stderr[-2000:]


def test_a_command_starts_no_mlflow_telemetry(tmp_path):
    """MLflow 3 takes DO_NOT_TRACK only when it is "true": without its own switch, each command importing it
    started a telemetry client (threads, a config fetch, a record per call) to send usage events. The child
    gets a bare environment: MLflow also stays quiet under pytest or CI, which would hide the defect."""
    code = f"""
from core.settings import Settings
from pipelines.runtime import prepare_environment
prepare_environment(Settings(home={str(tmp_path / "home")!r}))
from mlflow.telemetry.client import get_telemetry_client
print(get_telemetry_client())
"""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "PYTHONDONTWRITEBYTECODE") if key in os.environ}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.stdout.strip() == "None", proc.stderr[-2000:]


def test_the_scfrisk_program_ends_through_the_quick_exit():
    from importlib.metadata import entry_points

    assert entry_points(group="console_scripts")["scfrisk"].value == "pipelines.cli:entry_point"


def test_run_without_a_policy_file_is_refused_before_it_ingests(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no policy.toml here, and the default policy_file is relative
    home = tmp_path / "home"
    code, stderr = _cli(["run", "--source", str(REPO / "data_samples" / "platform")], monkeypatch, capsys, home)
    assert code != 0
    assert "policy file policy.toml does not exist" in _one_error_line(stderr)
    assert not (home / "raw").exists()


@pytest.mark.slow
def test_duckdb_out_of_memory_is_one_line_with_its_budget(prefect_server, tmp_path):
    """A memory limit too small for DuckDB: the CLI's one line names the stage, the table, the budget and where
    it came from, and the console has no traceback (Prefect's is kept off it as for bad input)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "ingest", "--source", str(REPO / "data_samples" / "platform")],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "SCFRISK_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_server,
             "SCFRISK_COMPUTE__MEMORY_LIMIT": "2MB"},
    )
    assert proc.returncode == 2
    error = _one_error_line(proc.stderr)
    assert "DuckDB ran out of memory in checking keys across partitions (" in error, error
    assert "its budget was 1.0 MiB, 50% of [compute] memory_limit = 2MB (SCFRISK_COMPUTE__MEMORY_LIMIT)" in error
    assert "OutOfMemoryException" not in proc.stderr and not (tmp_path / ".tmp").exists()


def test_a_commands_duckdb_keeps_to_its_budget_and_spills_under_scfrisk_home(tmp_path, monkeypatch, capsys):
    """`features training-set` reads the raw store with the workspace's budget (2MB: DuckDB runs out, one line
    naming it) and spill folder, not DuckDB's defaults (80% of the machine, `.tmp` in the working directory)."""
    from tests.rawdata import write_raw_store
    from tests.test_features import TABLES, T

    home = tmp_path / "home"
    settings = Settings(home=home)
    store = RawStore.from_settings(settings)
    write_raw_store(Path(store.root), TABLES)
    for reader in (store, store.pinned(), store.at(store.snapshot_id)):  # what flows hand their workers too
        spill = reader.connect().execute("SELECT current_setting('temp_directory')").fetchall()
        assert spill == [(str(home / "tmp" / "duckdb"),)]
    entities = tmp_path / "entities.parquet"
    pq.write_table(pa.table({"merchant_id": ["M1", "M2"], "as_of": [T, T]}), entities)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCFRISK_COMPUTE__MEMORY_LIMIT", "2MB")
    code, stderr = _cli(["features", "training-set", "--entities", str(entities), "--out", str(tmp_path / "out.csv")],
                        monkeypatch, capsys, home)
    assert code == 2
    assert "its budget was 1.0 MiB, 50% of [compute] memory_limit = 2MB" in _one_error_line(stderr)
    assert not (tmp_path / ".tmp").exists()


@pytest.mark.slow
def test_train_out_of_memory_names_the_stage(prefect_server, tmp_path):
    """`scfrisk train` builds a stale training set on the flow's engine, bucket by bucket like `features build`:
    DuckDB running out of memory there is the one line naming that stage (it named none when train built it on
    its own), and the console has no traceback."""
    from tests.rawdata import write_raw_store
    from tests.test_features import TABLES

    home = tmp_path / "home"
    write_raw_store(Path(RawStore.from_settings(Settings(home=home)).root), TABLES)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train"], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "SCFRISK_HOME": str(home), "PREFECT_API_URL": prefect_server,
             "SCFRISK_COMPUTE__MEMORY_LIMIT": "2MB"},
    )
    assert proc.returncode == 2
    error = _one_error_line(proc.stderr)
    assert "DuckDB ran out of memory in training set: its budget was 1.0 MiB" in error, error


def test_prefects_traceback_of_duckdb_out_of_memory_stays_off_the_console():
    """Raised in a flow's own process (outside its partitions), the CLI prints it as one line (`invoke`): Prefect's
    traceback of it and its 'Finished in state Failed' are dropped as for a `ScfriskError`."""
    import logging

    import duckdb

    from pipelines.runtime import UserErrorsOnce

    keep = UserErrorsOnce()
    try:
        duckdb.connect(config={"memory_limit": "1MB"}).execute("SELECT list(range) FROM range(1_000_000)")
    except duckdb.OutOfMemoryException as exc:
        error = (type(exc), exc, exc.__traceback__)
    failed = logging.LogRecord("prefect.flow_runs", logging.ERROR, "", 0, "Encountered exception", None, error)
    finished = logging.LogRecord("prefect.flow_runs", logging.ERROR, "", 0, "Finished in state Failed()", None, None)
    other = logging.LogRecord("prefect.flow_runs", logging.ERROR, "", 0, "Encountered exception", None,
                              (ValueError, ValueError("a bug"), None))
    for record in (failed, finished, other):
        record.flow_run_id = "run-1"
    assert [keep.filter(record) for record in (failed, finished)] == [False, False]
    assert keep.filter(other)
