"""The `scfrisk` command line: thin shell over the flows; bad input becomes one clear line, exit 2.

Each command checks its arguments and inputs first (paths, the raw tables its stage needs), then makes
sure the workspace's Prefect server answers (flow commands only, `pipelines.prefect_server`), and only
then imports the heavy libraries (Prefect, MLflow, GX): a mistake is refused in well under a second.
Help texts are plain text (no Rich markup), so `[service]` and the like print as written.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from core.errors import ScfriskError
from core.settings import Settings, load_settings
from core.sql import is_out_of_memory, out_of_memory
from pipelines.prefect_server import ensure_server, read_state, stop_server, user_api_url
from pipelines.runtime import (
    configure_logging,
    loading,
    prepare_environment,
    start_program,
    without_heartbeats,
)

log = logging.getLogger("scfrisk")

app = typer.Typer(
    help="Credit-risk pipeline for platform lending: simulate, ingest, features, train, limits, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj


POLICY_STAGES = ("limits", "run", "refresh", "monitor")
"""Stages that decide with the credit policy: a missing or invalid policy file is refused before they start,
not after the ingest and features of a `run` (minutes) with a traceback."""


def _orchestrated(ctx: typer.Context, stage: str | None = None, source: Path | str | None = None) -> Settings:
    """Before a flow command's heavy imports: the raw tables its stage needs, its credit policy, then a Prefect
    API to record its flow runs (the user's `PREFECT_API_URL`, else the workspace's server, started if needed), for
    runs without heartbeats (`runtime.without_heartbeats`)."""
    settings = _settings(ctx)
    if stage is not None:
        from core.batch import require_tables
        from core.raw_store import RawStore
        from core.sources import open_source

        store = RawStore.from_settings(settings)
        if source is None:
            require_tables(stage, store)
        else:
            batch = open_source(str(source))
            require_tables(stage, store, batch.tables(), batch.description)
    if stage in POLICY_STAGES:
        from credit.policy import load_policy

        load_policy(settings.policy_file)
    with loading():
        ensure_server(settings.home_dir, settings.prefect)
        ctx.with_resource(without_heartbeats())
    return settings


_BATCH_FOLDER = {"exists": True, "file_okay": False, "dir_okay": True}
"""A batch folder option: a path that is not a folder is refused before anything is imported."""


def _source_option(source: str) -> str:
    """A `--source` as the flow gets it: a batch folder (refused here when it does not exist, before pyarrow is
    even imported) or a database URL, its password moved to the environment (`core.postgres`)."""
    if "://" not in source:
        if not Path(source).is_dir():
            raise typer.BadParameter(f"batch folder {source} does not exist", param_hint="'--source'")
        return source
    from core.postgres import is_postgres_url, password_to_environment

    return password_to_environment(source) if is_postgres_url(source) else source


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (default: $SCFRISK_CONFIG or ./scfrisk.toml)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    configure_logging(verbose)
    settings = load_settings(config)
    prepare_environment(settings)
    ctx.obj = settings


@app.command()
def simulate(
    ctx: typer.Context,
    out: Annotated[str, typer.Option(help="Folder to write one Parquet dataset per table into, or a PostgreSQL "
                                          "URL (postgresql://user@host:5432/db) to load the platform into.")],
    merchants: Annotated[int, typer.Option(min=1, help="Number of merchants.")] = 2000,
    months: Annotated[int, typer.Option(min=3, max=120, help="Months of history.")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same data.")] = 42,
    start: Annotated[str, typer.Option(help="First day of the simulated history (YYYY-MM-DD).")] = "2024-01-01",
    orders_per_month: Annotated[float, typer.Option(
        min=0.1, help="Average orders per merchant and month (heavy-tailed across merchants): larger sellers "
                      "with more orders each, for the same number of merchants.")] = 10.0,
    days: Annotated[
        int,
        typer.Option(
            min=0,
            help="Write the last N days day by day: OUT/base as of N days before the end, then one batch a day "
            "in OUT/daily/YYYY-MM-DD with the rows written or changed that day (0: the whole history in OUT).",
        ),
    ] = 0,
    files: Annotated[Path | None, typer.Option(help="With a database --out: also keep the simulated files (and "
                                                     "the oracle) in this folder.")] = None,
) -> None:
    """Simulate a platform's merchants, orders, behaviour, inventory, receivables and loans.

    With --days N the same history is written as the platform's database grew: a base, then N daily
    batches, each one ingestible in order (`scfrisk ingest --source OUT/base`, then each day's folder);
    upserted by key they give the whole history. The oracle goes to OUT/oracle either way.
    --out may also be the platform's PostgreSQL database (postgresql://user@host:5432/db): its tables are
    created from the data model and the rows upserted by key, the base then each day in its own transaction.
    """
    from simulator import HISTORY_MONTHS, SimulationConfig, months_to_train, simulate_platform

    model = _settings(ctx).model
    needed = months_to_train(model)
    if months < needed:
        raise ScfriskError(
            f"--months {months} is too short to train on: with the [model] settings training needs at least "
            f"{needed} months ({HISTORY_MONTHS} of history before the first application, applications over 1 "
            f"training + {model.valid_months} validation + {model.test_months} test months, and the "
            f"{model.label_horizon_months}-month label horizon after them); use --months {needed} or more")
    config = SimulationConfig(n_merchants=merchants, months=months, seed=seed, start=start,
                              orders_per_month=orders_per_month)
    if "://" not in out:
        typer.echo(simulate_platform(config, Path(out), days=days).describe())
        return
    from tempfile import TemporaryDirectory

    from core.postgres import check, load_folder, redact
    from simulator.platform import BASE, DAILY

    check(out)  # a wrong URL, host or password is refused before the simulation runs
    with TemporaryDirectory(prefix="scfrisk-simulated-") as temporary:
        folder = files or Path(temporary)
        typer.echo(simulate_platform(config, folder, days=days).describe())
        batches = [folder / BASE, *sorted((folder / DAILY).glob("*"))] if days else [folder]
        totals: dict[str, int] = {}
        for batch in batches:  # the base, then each day's new and changed rows: one transaction each, in order
            for name, n in load_folder(out, batch).items():
                totals[name] = totals.get(name, 0) + n
    what = f"the base and {days} daily batches (upserted day by day)" if days else "the platform"
    typer.echo(f"loaded {what} into {redact(out)}: " + ", ".join(f"{name} {n:,}" for name, n in totals.items())
               + " rows upserted")


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[str | None, typer.Option(
        help="Batch folder with one Parquet/CSV file or folder per table, or the platform's database "
             "(postgresql://user@host:5432/db; password in PGPASSWORD or ~/.pgpass). Default: [ingest].source."
    )] = None,
) -> None:
    """Validate a batch of platform tables with Great Expectations and load it into the raw store; from a
    database, the rows new or changed since the last pull that committed."""
    source = source or _settings(ctx).ingest.source
    if not source:
        raise ScfriskError("no source to ingest: give --source, or set [ingest].source in scfrisk.toml")
    source = _source_option(source)
    from core.batch import missing_tables
    from core.sources import open_source

    open_source(source)  # a folder without tables, or an unknown URL, is refused before anything starts
    settings = _orchestrated(ctx)
    from core.raw_store import RawStore
    from pipelines.compute import on_engine
    with loading():
        from pipelines.ingest import ingest_flow

    result = on_engine(ingest_flow, settings)(source=source, settings=settings)
    typer.echo(result.describe())
    missing = missing_tables("train", RawStore.from_settings(settings))
    if missing:
        typer.echo(f"note: the raw store has no {', '.join(missing)} yet; `scfrisk train`, `limits` and `run` "
                   f"need {'it' if len(missing) == 1 else 'them'}")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: [service].host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: [service].port).")] = None,
) -> None:
    """Serve the live published bundle over HTTP (needs an API key in SCFRISK_API_KEYS or [service])."""
    import os

    import uvicorn

    from serving.app import create_app
    from serving.auth import Keyring

    settings = _settings(ctx)
    application = create_app(settings, Keyring.from_config(
        [key.get_secret_value() for key in settings.service.api_keys], os.environ))
    uvicorn.run(application, host=host or settings.service.host, port=port or settings.service.port,
                workers=1, log_level="info", access_log=False)


@app.command()
def rollback(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option(help="Bundle id to go live (default: the one before the live one).")] = None,
) -> None:
    """Point the service back at an earlier published bundle (it is re-checked before the switch)."""
    from pipelines.publish import rollback as switch_back

    typer.echo(f"live bundle: {switch_back(_settings(ctx), to)}")


@app.command()
def replay(
    ctx: typer.Context,
    request_id: Annotated[list[str] | None, typer.Option(help="A decision to replay (repeat the option); "
                                                              "default: every line of the log.")] = None,
    audit_log: Annotated[Path | None, typer.Option(help="Audit log to read (default: the workspace's).",
                                                   exists=True, dir_okay=False)] = None,
) -> None:
    """Re-score logged decisions with the bundles that made them; exits 1 when any answer differs."""
    from serving.audit import read_audit
    from serving.bundle import replay_decisions
    from serving.signing import bundle_key

    settings = _settings(ctx)
    path = audit_log or settings.audit_log
    records = read_audit(path)
    if request_id:
        wanted = set(request_id)
        unknown = sorted(wanted - {r["request_id"] for r in records})
        if unknown:
            raise ScfriskError(f"no decision {', '.join(unknown)} in {path}")
        records = [r for r in records if r["request_id"] in wanted]
    differ = 0
    for record, again in replay_decisions(records, settings.path("published"), bundle_key(settings)):
        logged = {"pd": record["pd"], "grade": record["grade"], "decision": record["decision"]}
        if again != logged:
            differ += 1
            typer.echo(f"{record['request_id']}: logged {logged}, replayed {again}")
    typer.echo(f"replayed {len(records)} decision(s): {len(records) - differ} the same, {differ} different")
    if differ:
        raise typer.Exit(1)


@app.command()
def limits(
    ctx: typer.Context,
    as_of: Annotated[
        datetime | None,
        typer.Option("--as-of", help="Point in time of PDs and features (default: the end of the ingested data)."),
    ] = None,
) -> None:
    """Credit limits of every merchant and product from the champion PD model and the credit policy."""
    settings = _orchestrated(ctx, "limits")
    from pipelines.compute import on_engine
    with loading():
        from pipelines.limits import limits_flow

    typer.echo(on_engine(limits_flow, settings)(settings=settings, as_of=as_of).describe())


@app.command()
def monitor(
    ctx: typer.Context,
    as_of: Annotated[
        datetime | None,
        typer.Option("--as-of", help="Day to monitor (default: the raw store's latest, midnight after its last "
                                     "order)."),
    ] = None,
) -> None:
    """Early warning on every live loan: the day's alerts (policy [monitoring]), a watch-list page, and a new
    bundle that carries them, so the service applies their freezes and cuts at once."""
    settings = _orchestrated(ctx, "monitor")
    from pipelines.monitor import monitor_flow

    typer.echo(monitor_flow(settings=settings, as_of=as_of).describe())


@app.command()
def train(
    ctx: typer.Context,
    table: Annotated[
        Path | None, typer.Option(help="Train on this Parquet/CSV feature table instead of the feature store.",
                                  exists=True)
    ] = None,
    target: Annotated[str, typer.Option(help="Default flag column of --table (0/1, or e.g. good/bad).")] = "defaulted",
    time_col: Annotated[
        str | None, typer.Option("--time-col", help="Application time of --table rows: out-of-time split.")
    ] = None,
    id_col: Annotated[str | None, typer.Option("--id-col", help="Row identifier of --table (not a feature).")] = None,
    test_table: Annotated[
        Path | None, typer.Option("--test-table", help="Test on this table; --table only gives train/validation.",
                                  exists=True)
    ] = None,
    metrics_out: Annotated[Path | None, typer.Option("--metrics-out", help="Write test metrics JSON here.")] = None,
    oracle: Annotated[
        Path | None, typer.Option(help="Simulator output folder: compare with its true PD (oracle/).", **_BATCH_FOLDER)
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option("--model-name", help="Registered model of --table (default: scfrisk-table-<file name>); "
                                          "never the platform's model."),
    ] = None,
) -> None:
    """Train, evaluate and register a PD model; it replaces the champion only if it passes the gates."""
    if model_name is not None and table is None:
        raise ScfriskError("--model-name names the model of your own table: use it with --table")
    settings = _orchestrated(ctx, None if table is not None else "train")
    from pipelines.compute import on_engine
    from pipelines.train import check_table_model_name, table_model_name, train_flow, train_table_flow

    if table is not None:
        check_table_model_name(settings, table_model_name(table, model_name))  # one line, before the flow
        outcome = on_engine(train_table_flow, settings)(
            settings=settings, table=str(table), target=target, time_col=time_col, id_col=id_col,
            test_table=str(test_table) if test_table else None,
            metrics_out=str(metrics_out) if metrics_out else None, model_name=model_name)
    else:
        outcome = on_engine(train_flow, settings)(settings=settings, oracle=str(oracle) if oracle else None,
                                                  metrics_out=str(metrics_out) if metrics_out else None)
    typer.echo(outcome.describe())


@app.command()
def promote(
    ctx: typer.Context,
    version: Annotated[str, typer.Option(help="Registered model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why the gates are overridden (recorded on the version).")],
) -> None:
    """Manual override: make a model version the champion, recording who, when and why."""
    from models.registry import promote as promote_version

    settings = _settings(ctx)
    promote_version(settings, version, reason)
    typer.echo(f"{settings.mlflow.registered_model} version {version} is now champion")


features_app = typer.Typer(help="Feature store: point-in-time training sets, offline snapshots, online vectors.",
                            no_args_is_help=True, rich_markup_mode=None)
app.add_typer(features_app, name="features")


@features_app.command("training-set")
def features_training_set(
    ctx: typer.Context,
    entities: Annotated[Path, typer.Option(help="Parquet/CSV with merchant_id, as_of and any columns to carry.")],
    out: Annotated[Path, typer.Option(help="Output .parquet or .csv: the entity rows plus every feature.")],
) -> None:
    """Point-in-time features for each entity row, using only facts strictly before its as_of."""
    from core.files import read_frame
    from core.raw_store import RawStore
    from features.training_set import get_training_set

    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ScfriskError(f"{out}: use a .parquet or .csv file")
    frame = get_training_set(read_frame(entities, "entity file"), RawStore.from_settings(_settings(ctx)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    typer.echo(f"{len(frame):,} rows x {frame.shape[1]} columns -> {out}")


@features_app.command("materialize")
def features_materialize(
    ctx: typer.Context,
    as_of: Annotated[datetime, typer.Option("--as-of", help="Point in time of the served feature vectors.")],
) -> None:
    """Write the offline snapshot for as_of (or reuse it) and publish it as the online store."""
    from features.offline_store import OfflineStore
    from features.online_store import publish_online

    offline = OfflineStore.from_settings(_settings(ctx))
    typer.echo(f"online features as of {as_of:%Y-%m-%d %H:%M:%S} -> {publish_online(offline, as_of)}")


@features_app.command("build")
def features_build(
    ctx: typer.Context,
    online_as_of: Annotated[
        datetime | None, typer.Option("--online-as-of", help="As-of of the online vectors (default: latest month).")
    ] = None,
) -> None:
    """Training set, monthly snapshots and online vectors, recomputed only where the data changed."""
    settings = _orchestrated(ctx, "features")
    from pipelines.compute import on_engine
    from pipelines.features import build_features_flow

    as_of = online_as_of.isoformat() if online_as_of else None
    result = on_engine(build_features_flow, settings)(settings=settings, online_as_of=as_of)
    typer.echo(result.describe())


@app.command()
def report(
    ctx: typer.Context,
    model_version: Annotated[str, typer.Option("--model-version", help="Registered version of the PD model.")],
) -> None:
    """Risk report of a model version: one self-contained HTML file in the workspace, also logged to MLflow."""
    with loading():
        from pipelines.report import report_for_version

    typer.echo(f"risk report: {report_for_version(_settings(ctx), model_version)}")


@app.command("run")
def run_pipeline(
    ctx: typer.Context,
    source: Annotated[str, typer.Option(
        help="Batch folder of platform tables to ingest first, or the platform's database "
             "(postgresql://user@host:5432/db; password in PGPASSWORD or ~/.pgpass).")],
    oracle: Annotated[
        Path | None, typer.Option(help="Simulator output folder: also measure the gap to its true PD.",
                                  **_BATCH_FOLDER)
    ] = None,
) -> None:
    """The whole pipeline as one Prefect flow: ingest -> features -> train -> explain -> limits -> publish."""
    source = _source_option(source)
    settings = _orchestrated(ctx, "run", source)
    from pipelines.compute import on_engine
    from pipelines.run import run_flow

    summary = on_engine(run_flow, settings)(settings=settings, source=source,
                                            oracle=str(oracle) if oracle else None)
    typer.echo(summary.describe())


@app.command()
def refresh(
    ctx: typer.Context,
    source: Annotated[str, typer.Option(help="Batch folder of the day's pull: new rows and changed rows.")],
    as_of: Annotated[
        datetime | None, typer.Option(help="Midnight to refresh to (default: the one after the newest order).")
    ] = None,
) -> None:
    """The daily refresh as one Prefect flow: pull -> raw store -> online features rolled forward (no full
    rebuild) -> re-score with the champion -> publish a bundle the running service switches to."""
    source = _source_option(source)
    settings = _orchestrated(ctx, "refresh", source)
    from pipelines.refresh import refresh_flow

    summary = refresh_flow(settings=settings, source=source, as_of=as_of.isoformat() if as_of else None)
    typer.echo(summary.describe())


@app.command()
def vacuum(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed, with its bytes; remove "
                                                            "nothing.")] = False,
) -> None:
    """Remove what the workspace keeps from before [retention] days that nothing needs any more: old raw data
    files and snapshots, daily feature files, bundles, limits and alerts. Kept however old: the latest
    snapshot, every registered model's training snapshot, the live bundle, the bundles logged decisions were
    made with, and the audit log."""
    settings = _orchestrated(ctx)
    from pipelines.retention import vacuum_flow

    typer.echo(vacuum_flow(settings=settings, dry_run=dry_run).describe())


@app.command()
def schedule(
    ctx: typer.Context,
    source: Annotated[Path, typer.Option(help="Batch folder the platform's extract (monthly) or pull (daily) "
                                              "lands in.")],
    cron: Annotated[str | None, typer.Option(help="When to run (cron, UTC); default: 03:00 on the 1st for run, "
                                                  "02:00 every day for refresh.")] = None,
    flow: Annotated[str, typer.Option(help="Which flow: run (monthly pipeline) or refresh (daily).")] = "run",
) -> None:
    """Serve `scfrisk run` monthly or `scfrisk refresh` daily (needs `prefect server start` and PREFECT_API_URL)."""
    import os

    if flow not in ("run", "refresh"):
        raise ScfriskError(f"schedule: --flow must be run or refresh, not '{flow}'")
    if "PREFECT_API_URL" not in os.environ:
        raise ScfriskError("scheduling needs a Prefect server: run `prefect server start`, then "
                           "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    from prefect import serve

    if flow == "refresh":
        from pipelines.refresh import daily_deployment

        serve(daily_deployment(_settings(ctx), source, cron or "0 2 * * *"))
    else:
        from pipelines.run import monthly_deployment

        serve(monthly_deployment(_settings(ctx), source, cron or "0 3 1 * *"))


@app.command()
def demo(
    ctx: typer.Context,
    source: Annotated[
        Path, typer.Option(help="Batch folder of platform tables.", **_BATCH_FOLDER)
    ] = Path("data_samples/platform"),
    port: Annotated[int, typer.Option(help="Port of the demo service on 127.0.0.1.")] = 8000,
) -> None:
    """Run the pipeline, start the service in the background, score sample merchants over HTTP."""
    settings = _orchestrated(ctx, "run", source)
    from pipelines.demo import run_demo

    run_demo(settings, source, port)


server_app = typer.Typer(help="The workspace's Prefect server, which records every flow run: flow commands "
                           "start it when needed and reuse it; it stops after [prefect] idle_minutes without "
                           "use, when its workspace is removed, or on `scfrisk server stop`.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(ctx: typer.Context) -> None:
    """Start the workspace's Prefect server now (flow commands otherwise start it on first use)."""
    settings = _settings(ctx)
    typer.echo(f"Prefect API: {ensure_server(settings.home_dir, settings.prefect)}")


@server_app.command("status")
def server_status(ctx: typer.Context) -> None:
    """Whether the workspace's Prefect server runs and answers (exit 1 when it does not run)."""
    from pipelines.prefect_server import is_healthy, is_running

    if user_api_url():
        typer.echo(f"PREFECT_API_URL is set ({user_api_url()}): flow commands use that server, none is managed")
        return
    home = _settings(ctx).home_dir
    state = read_state(home)
    if state is None or not is_running(state, home):
        typer.echo("not running (the next flow command starts it)")
        raise typer.Exit(1)
    typer.echo(f"running: {state.describe()}; {'answering' if is_healthy(state) else 'NOT answering'}")


@server_app.command("stop")
def server_stop(ctx: typer.Context) -> None:
    """Stop the workspace's Prefect server (the next flow command starts it again)."""
    stopped = stop_server(_settings(ctx).home_dir)
    typer.echo(f"stopped the Prefect server ({stopped.describe()})" if stopped else "no Prefect server was running")


def invoke() -> int:
    """The command of `sys.argv` in this process; its exit code. User errors print one line and give 2,
    never a traceback; so does DuckDB running out of its memory budget (`core.sql.out_of_memory`)."""
    try:
        code = app(standalone_mode=False)  # a command's `typer.Exit(n)` comes back as n
        return code if isinstance(code, int) else 0
    except ScfriskError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return 2
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        if code is None or isinstance(code, int):
            return code or 0
        typer.echo(code, err=True)  # `sys.exit("message")`: Python prints it and exits 1
        return 1
    except typer.TyperException as exc:  # usage errors: an unknown option, a path that does not exist
        context = getattr(exc, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None else ""
        typer.secho(f"error: {exc.format_message()}{hint}", err=True, fg=typer.colors.RED)
        return exc.exit_code
    except typer.Abort:
        return 1
    except Exception as exc:  # last: usage errors and exits are exceptions too
        if not is_out_of_memory(exc):
            raise
        typer.secho(f"error: {out_of_memory()}", err=True, fg=typer.colors.RED)  # outside any stage's partitions
        return 2


def run() -> None:
    """The command of `sys.argv` inside a host process (pytest, a notebook), which goes on afterwards:
    `sys.exit(code)` unless the command succeeded."""
    code = invoke()
    if code:
        sys.exit(code)


def entry_point() -> None:
    """The `scfrisk` program: the command, then the end of the process without the interpreter's teardown
    (`runtime.start_program`)."""
    start_program().exit(invoke())


if __name__ == "__main__":
    entry_point()
