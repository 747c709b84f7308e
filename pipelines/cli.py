"""The `scfrisk` command line: thin shell over the flows; bad input becomes one clear line, exit 2.

Heavy libraries (Prefect, MLflow, GX) are imported inside each command, after the workspace
environment is prepared, so `scfrisk --help` and `scfrisk simulate` stay fast.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from pipelines.config import Settings, load_settings
from pipelines.errors import ScfriskError
from pipelines.runtime import configure_logging, prepare_environment

log = logging.getLogger("scfrisk")

app = typer.Typer(
    help="Credit-risk pipeline for platform lending: simulate, ingest, features, train, limits, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj


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
    out: Annotated[Path, typer.Option(help="Folder to write one Parquet dataset per table into.")],
    merchants: Annotated[int, typer.Option(min=1, help="Number of merchants.")] = 2000,
    months: Annotated[int, typer.Option(min=3, max=120, help="Months of history.")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same data.")] = 42,
    start: Annotated[str, typer.Option(help="First day of the simulated history (YYYY-MM-DD).")] = "2024-01-01",
) -> None:
    """Simulate a platform's merchants, orders, behaviour, inventory, receivables and loans."""
    from pipelines.simulate import SimulationConfig, simulate_platform

    summary = simulate_platform(
        SimulationConfig(n_merchants=merchants, months=months, seed=seed, start=start), out
    )
    typer.echo(summary.describe())


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[Path, typer.Option(help="Folder with one Parquet/CSV file or folder per table.")],
) -> None:
    """Validate a batch of platform tables with Great Expectations and load it into the raw store."""
    from pipelines.ingest import ingest_flow

    result = ingest_flow(source=str(source), settings=_settings(ctx))
    typer.echo(result.describe())


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
    application = create_app(settings, Keyring.from_config(settings.service.api_keys, os.environ))
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
def limits(
    ctx: typer.Context,
    as_of: Annotated[
        datetime | None, typer.Option("--as-of", help="Point in time of PDs and features (default: now, UTC).")
    ] = None,
) -> None:
    """Credit limits of every merchant and product from the champion PD model and the credit policy."""
    from pipelines.limits import limits_flow

    typer.echo(limits_flow(settings=_settings(ctx), as_of=as_of).describe())


@app.command()
def report(
    ctx: typer.Context,
    model_version: Annotated[str, typer.Option("--model-version", help="Registered version of the PD model.")],
) -> None:
    """Risk report of a model version: one self-contained HTML file in the workspace, also logged to MLflow."""
    from pipelines.report import report_for_version

    typer.echo(f"risk report: {report_for_version(_settings(ctx), model_version)}")


def run() -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except ScfriskError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    run()
