"""`scfrisk demo` (what `make demo` runs): the pipeline, then a live service scored over real HTTP.

The service is started as its own background process (pid and log in the workspace) so the command ends
with it still answering, as the loan engine would find it; a second demo stops the first one's service.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from core.errors import ScfriskError
from core.settings import Settings
from credit.policy import CreditPolicy, load_policy

READY_TIMEOUT_SECONDS = 90


def _stop_previous(pid_file: Path) -> None:
    if not pid_file.is_file():
        return
    try:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        time.sleep(1)
    except (ProcessLookupError, ValueError):
        pass
    pid_file.unlink(missing_ok=True)


def _call(url: str, key: str | None = None, payload: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    body = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_service(settings: Settings, port: int, key: str) -> tuple[int, Path]:
    """Start `scfrisk serve` detached; return its pid and log file once `/readyz` answers."""
    home = settings.home_dir
    pid_file, log_file = home / "service.pid", home / "service.log"
    _stop_previous(pid_file)
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "SCFRISK_API_KEYS": key, "SCFRISK_HOME": str(home)},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ScfriskError(f"the service exited with code {process.returncode}; see {log_file}")
        try:
            if _call(f"http://127.0.0.1:{port}/readyz").get("status") == "ready":
                return process.pid, log_file
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise ScfriskError(f"the service did not become ready in {READY_TIMEOUT_SECONDS} s; see {log_file}")


def _typical(rows: pd.DataFrame, what: str) -> pd.Series:
    """The row of median PD: a typical case, not an extreme one."""
    if rows.empty:
        raise ScfriskError(f"the limits table has no {what} to show in the demo")
    rows = rows.sort_values(["pd", "merchant_id"])
    return rows.iloc[len(rows) // 2]


def sample_requests(limits_file: Path, policy: CreditPolicy) -> list[dict]:
    """Three requests that show what the policy does, picked from the limits table (the outcomes follow
    from the data, none is forced): a typical merchant eligible for order financing asking for part of its
    limit (approved), a typical microloan merchant asking for more than its limit but less than the
    referral ratio (counter-offer), and a typical merchant turned away from order financing by the rule
    that turns away most (declined, with that rule first among its reasons)."""
    limits = pd.read_parquet(limits_file)
    limits["product"] = limits["product"].astype(str)
    orders = limits[limits["product"] == "order_financing"]
    approve = _typical(orders[orders["eligible"]], "merchant eligible for order financing")
    loans = limits[(limits["product"] == "microloan") & limits["eligible"]
                   & (limits["merchant_id"] != approve["merchant_id"])]
    counter = _typical(loans, "other merchant eligible for a microloan")
    refused = orders[~orders["eligible"] & (orders["exclusion_reason"].astype(str) != "segment")]
    commonest = refused["exclusion_reason"].astype(str).mode()
    decline = _typical(refused[refused["exclusion_reason"].astype(str) == commonest.iloc[0]] if len(commonest)
                       else refused, "merchant declined for order financing")
    step, unit = policy.product("microloan").round_to, policy.product("order_financing").round_to
    above = min(np.ceil(counter["limit"] * 1.5 / step) * step, policy.decision.refer_ratio * counter["limit"])
    return [
        {"merchant_id": approve["merchant_id"], "product": "order_financing",
         "requested_amount": float(max(np.floor(approve["limit"] * 0.6 / unit) * unit, unit))},
        {"merchant_id": counter["merchant_id"], "product": "microloan", "requested_amount": float(above)},
        {"merchant_id": decline["merchant_id"], "product": "order_financing",
         "requested_amount": float(np.round(orders.loc[orders["eligible"], "limit"].median(), -2) or 500.0)},
    ]


def describe_answer(answer: dict) -> str:
    decision = answer.get("decision") or {}
    lines = [f"{answer['merchant_id']}: PD {answer['pd']:.2%}, grade {answer['grade']}, "
             f"decision {decision.get('outcome', '-')} {decision.get('amount', '')}".rstrip()]
    lines += [f"    limit {x['product']}: {x['limit']:,.0f} ({x['binding_constraint']})" if x["eligible"]
              else f"    limit {x['product']}: not eligible ({x['exclusion_description']})"
              for x in answer["limits"]]
    lines += [f"    reason ({r['source']}): {r['description']}" for r in answer["reason_codes"]]
    return "\n".join(lines)


def run_demo(settings: Settings, source: Path, port: int) -> None:
    from pipelines.run import run_flow

    summary = run_flow(settings=settings, source=str(source))
    typer.echo(summary.describe())
    key = secrets.token_hex(20)
    pid, log_file = start_service(settings, port, key)
    base = f"http://127.0.0.1:{port}"
    typer.echo(f"\nservice live at {base} (pid {pid}, log {log_file}); demo API key: {key}\n")
    requests = sample_requests(summary.limits, load_policy(settings.policy_file))
    for request in requests:
        typer.echo(f"POST /v1/score {json.dumps(request)}")
        typer.echo(describe_answer(_call(f"{base}/v1/score", key, request)) + "\n")
    typer.echo(
        f"try it:  curl -s -X POST {base}/v1/score -H 'X-API-Key: {key}' -H 'Content-Type: application/json' "
        f"-d '{{\"merchant_id\": \"{requests[0]['merchant_id']}\"}}'\n"
        f"docs:    {base}/docs      stop it:  kill {pid}"
    )
