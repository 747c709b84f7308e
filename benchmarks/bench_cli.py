"""Fixed cost of a command: what `scfrisk` spends besides its work, each command its own process.

Commands: a refused bad path (`ingest --source /does/not/exist`), and flow commands with little work
(`ingest` of the batch already loaded, `limits`, `report`) in a workspace made by one
`scfrisk run --source data_samples/platform` (not measured). Each command runs REPEATS times; medians of
wall and CPU seconds (the command and the children it waits for, plus the CPU the workspace's Prefect
server spent meanwhile). Baseline, the work: the same functions called in one process whose imports are
done (second call of each). Fixed cost = command - work.

`--baseline CHECKOUT` also measures another checkout of scfrisk set up with its own `make setup` (for
example `git worktree add --detach ../base <commit>`): its commands run interleaved with this checkout's,
on the same workspace and server (through `PREFECT_API_URL`, so neither restarts it), so that before and
after meet the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_section

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples" / "platform"
REPEATS = 3
COMMANDS = {
    "ingest, bad path": ["ingest", "--source", "/does/not/exist"],
    "ingest, batch already loaded": ["ingest", "--source", str(SAMPLE)],
    "limits": ["limits"],
    "report": ["report", "--model-version", "1"],
}


def _cli(args: list[str], env: dict[str, str], check: bool = True, checkout: Path | None = None
         ) -> tuple[float, float]:
    """Wall and CPU seconds of one command (children it waited for included), of this checkout or another."""
    python = str(checkout / ".venv" / "bin" / "python") if checkout else sys.executable
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([python, "-m", "pipelines.cli", *args], env=env, capture_output=True, text=True,
                          check=False, cwd=checkout)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _server_cpu(home: Path) -> float:
    """CPU seconds the workspace's Prefect server has used so far (0 when there is none)."""
    try:
        pid = json.loads((home / "prefect" / "server.json").read_text())["pid"]
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, KeyError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _work(home: str) -> None:
    """Child: the commands' work in one warm process; prints {name: [wall, cpu]} of the second calls."""
    from core.settings import Settings
    from pipelines.ingest import ingest
    from pipelines.limits import build_limits
    from pipelines.report import report_for_version
    from pipelines.runtime import prepare_environment

    settings = Settings(home=Path(home))
    prepare_environment(settings)
    work = {"ingest, batch already loaded": lambda: ingest(SAMPLE, settings),
            "limits": lambda: build_limits(settings), "report": lambda: report_for_version(settings, "1")}
    out = {}
    for name, call in work.items():
        for _ in range(2):
            start, cpu = time.perf_counter(), time.process_time()
            call()
            out[name] = [time.perf_counter() - start, time.process_time() - cpu]
    print(json.dumps(out))


def _measure(home: Path, env: dict[str, str], checkouts: dict[str, Path | None]
             ) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """REPEATS rounds; in each, every command of every checkout in turn (which checkout goes first alternates
    between rounds): {checkout: {command: [(wall, cpu)]}}."""
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {label: {name: [] for name in COMMANDS}
                                                             for label in checkouts}
    order = list(checkouts.items())
    for round_ in range(REPEATS):
        for name, args in COMMANDS.items():
            for label, checkout in reversed(order) if round_ % 2 else order:
                server = _server_cpu(home)
                wall, cpu = _cli(args, _checkout_env(env, home, checkout), check=name != "ingest, bad path",
                                 checkout=checkout)
                runs[label][name].append((wall, cpu + _server_cpu(home) - server))
    return runs


def _checkout_env(env: dict[str, str], home: Path, checkout: Path | None) -> dict[str, str]:
    """Another checkout reaches the workspace's server as a user's own (it would restart a server that runs
    another install)."""
    if checkout is None:
        return env
    port = json.loads((home / "prefect" / "server.json").read_text())["port"]
    return {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home / "prefect")}


def _work_of(home: Path, env: dict[str, str], checkout: Path | None) -> dict[str, list[float]]:
    python = str(checkout / ".venv" / "bin" / "python") if checkout else sys.executable
    proc = subprocess.run([python, "-c", f"from benchmarks.bench_cli import _work; _work({str(home)!r})"],
                          env=_checkout_env(env, home, checkout), capture_output=True, text=True, check=True,
                          cwd=checkout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _revision(checkout: Path | None) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=checkout or Path(__file__).parent)
    return proc.stdout.strip() or "?"


def main(baseline: Path | None = None) -> None:
    checkouts: dict[str, Path | None] = {"this checkout": None}
    if baseline is not None:
        checkouts["baseline"] = baseline.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "SCFRISK_HOME": str(home)}
        env.pop("PREFECT_API_URL", None)
        try:
            _cli(["run", "--source", str(SAMPLE)], env)
            _cli(["server", "stop"], env, check=False)
            server_start = _cli(["server", "start"], env, check=False)[0]
            has_server = (home / "prefect" / "server.json").is_file()
            load_before = os.getloadavg()
            runs = _measure(home, env, checkouts)
            work = {label: _work_of(home, env, checkout) for label, checkout in checkouts.items()}
        finally:
            _cli(["server", "stop"], env, check=False)  # (a code without the server command just fails)
    load = os.getloadavg()
    tables, fixed = [], {}
    for label, checkout in checkouts.items():
        rows, fixed[label] = [], {}
        for name, samples in runs[label].items():
            wall, cpu = statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)
            w_wall, w_cpu = work[label].get(name, [0.0, 0.0])
            fixed[label][name] = wall - w_wall
            rows.append(f"| {name} | {wall:.1f} | {cpu:.1f} | {w_wall:.1f} | {w_cpu:.1f} | **{wall - w_wall:.1f}** | "
                        f"{cpu - w_cpu:.1f} |")
        title = f"{label} ({_revision(checkout)})" if baseline is not None else ""
        tables.append(f"""{f"**{title}**{chr(10)}{chr(10)}" if title else ""}| command | wall s | CPU s | work wall s | work CPU s | fixed wall s | fixed CPU s |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}""")
    server_line = (f"Starting the workspace's Prefect server (`scfrisk server start`, paid once by the first flow "
                   f"command of a workspace): {server_start:.1f} s wall." if has_server else
                   "No workspace server: every flow command starts Prefect's temporary server (included above).")
    ours = fixed["this checkout"]
    interleaved = (" The two checkouts' commands ran interleaved (command by command, each round), on one "
                   "workspace and its server." if baseline is not None else "")
    body = f"""
`python -m benchmarks.bench_cli{" --baseline <checkout>" if baseline is not None else ""}`: each command its own
process, median of {REPEATS}; CPU = the command, the children it waits for and the workspace's Prefect server
meanwhile. Work = the same functions called in one warm process (imports done). Fixed = command - work.{interleaved}
Load average (1, 5, 15 min) before the commands: {load_before[0]:.1f}, {load_before[1]:.1f}, {load_before[2]:.1f};
at the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} (2 cores: above 2, wall times stretch, CPU times much less).

{(chr(10) + chr(10)).join(tables)}

{server_line}

Goals (issue #14), this checkout: a bad path refused in under 1 s: {_verdict(ours["ingest, bad path"] < 1)}; fixed
cost of a flow command at most 5 s above its work: {"; ".join(f"{name} {_verdict(cost <= 5)}"
                                                           for name, cost in ours.items()
                                                           if name != "ingest, bad path")}.{_busy(load_before, load)}
"""
    print(body)
    write_section("Command start-up", body)


def _busy(*loads: tuple[float, float, float]) -> str:
    """The caveat of verdicts on wall times measured while other jobs held the cores."""
    cores = os.cpu_count() or 1
    if max(load[0] for load in loads) <= cores:
        return ""
    return (f" Measured at a load above the machine's {cores} cores: wall times include waiting for a core, "
            "so these verdicts say little; compare the checkouts' CPU figures, and judge the goals on an idle "
            "machine.")


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout (with its .venv) to measure alongside")
    main(parser.parse_args().baseline)
