"""What every benchmark shares: the machine line, peak memory of a child process, the results file."""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Latest figures of `make bench` (`python -m benchmarks`); each section is rewritten by its own\n"
    "benchmark module. Ratios compare against a baseline measured in the same run on the same data.\n"
)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run a child process; return (wall seconds, peak RSS in MB of that child, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    peak_mb = float(proc.stderr.strip().splitlines()[-1].split("=")[1])
    return wall, peak_mb, proc.stdout


# Runs the real command in a grandchild so the reported peak RSS is the command's own.
_WRAPPER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stderr.write(f"\\npeak_mb={peak_kb / 1024:.1f}\\n")
sys.exit(rc)
"""


def self_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of docs/benchmarks.md, leaving the others untouched."""
    text = DOCS.read_text() if DOCS.exists() else HEADER
    section = f"## {title}\n\n_{time.strftime('%Y-%m-%d')}, {machine()}_\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
