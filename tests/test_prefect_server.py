"""The workspace's Prefect server: started by the first flow command, reused, stopped on demand, when idle
or when its workspace is removed; a flow command killed with `kill -9` leaves no process behind but that
one managed server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipelines.prefect_server import STATE_FILE, is_running, read_state
from tests.conftest import SAMPLE

MARK = "SCFRISK_TEST_PROCESS_MARK"


def _marked(mark: str) -> set[int]:
    """Live processes (not zombies) started with this mark in their environment, wherever they now hang."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if f"{MARK}={mark}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def _env(home: Path, mark: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no user server: the workspace's
    return {**env, "SCFRISK_HOME": str(home), MARK: mark}


def _scfrisk(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_kill_9_of_a_flow_command_leaves_only_the_managed_server(tmp_path):
    home, mark = tmp_path / "home", uuid.uuid4().hex
    env = _env(home, mark)
    command = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ingest", "--source", str(SAMPLE)],
                               env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    server = None
    try:
        for line in command.stderr:  # wait until the flow runs: Prefect API up, work started
            if "Beginning flow run" in line:
                break
        else:
            pytest.fail(f"the command ended (exit {command.wait()}) before its flow started")
        os.kill(command.pid, signal.SIGKILL)
        command.wait()
        server = read_state(home)
        managed = {server.pid} if server is not None else set()
        assert not _marked(mark) - managed, "nothing but the workspace's managed server outlives the command"
        assert server is not None and is_running(server, home) and _marked(mark) == managed

        # A later flow command reuses it (bad input: the flow fails at once, with one line and no traceback).
        (tmp_path / "empty").mkdir()
        again = _scfrisk(["ingest", "--source", str(tmp_path / "empty")], env)
        assert again.returncode == 2 and "Traceback" not in again.stderr
        assert [line for line in again.stderr.splitlines() if line.startswith("error:")] == [
            f"error: no table files in {tmp_path / 'empty'}; expected any of: " + again.stderr.split("any of: ")[1]
            .splitlines()[0]]
        assert read_state(home) == server and "started the workspace's Prefect server" not in again.stderr

        status = _scfrisk(["server", "status"], env)
        assert status.returncode == 0 and f"pid {server.pid}" in status.stdout and "answering" in status.stdout
        stopped = _scfrisk(["server", "stop"], env)
        assert stopped.returncode == 0 and f"pid {server.pid}" in stopped.stdout
        assert not (home / "prefect" / STATE_FILE).exists() and not _marked(mark)
        assert _scfrisk(["server", "status"], env).returncode == 1
    finally:
        for pid in _marked(mark):  # whatever a failed assertion left behind
            os.kill(pid, signal.SIGKILL)


IDLE_MINUTES = 0.1
"""6 s: long enough for a command's pings (every 1.5 s) under load, short enough for a test."""
KEEPER = """
import sys, time
from pathlib import Path
from core.settings import load_settings
from pipelines.prefect_server import ensure_server, is_healthy, is_running, read_state

settings = load_settings()
ensure_server(settings.home_dir, settings.prefect)
print("ready", flush=True)
time.sleep(float(sys.argv[1]))  # a long task that calls no API, like a 45-minute fit on the local engine
state = read_state(settings.home_dir)
print(state is not None and is_running(state, settings.home_dir) and is_healthy(state))
"""


def _ended(mark: str, within: float = 120.0) -> bool:
    """Whether the marked processes end (a wait, not a timing: far longer than they need)."""
    deadline = time.monotonic() + within
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not _marked(mark)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_the_server_stops_when_idle_and_never_under_a_running_command(tmp_path):
    home, mark = tmp_path / "home", uuid.uuid4().hex
    env = {**_env(home, mark), "SCFRISK_PREFECT__IDLE_MINUTES": str(IDLE_MINUTES),
           "SCFRISK_PREFECT__CHECK_SECONDS": "0.5"}
    try:
        # A command outlasting the idle time (2.5 times) without an API call: its pings keep the server.
        keeper = subprocess.Popen([sys.executable, "-c", KEEPER, str(IDLE_MINUTES * 60 * 2.5)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert keeper.stdout.readline().strip() == "ready", keeper.communicate()[1]
        status = _scfrisk(["server", "status"], env)
        assert f"stops after {IDLE_MINUTES:g} min without use" in status.stdout, status.stdout
        output, errors = keeper.communicate(timeout=600)
        assert keeper.returncode == 0, errors
        assert output.strip() == "True", "the server stopped under a running command"

        # Nobody uses it any more: it stops by itself, its log says why, and `status` says it does not run.
        assert _ended(mark), "the idle server did not stop"
        log = (home / "prefect" / "server.log").read_text()
        assert "stopping: no API request for" in log and "[prefect] idle_minutes" in log, log
        assert not (home / "prefect" / STATE_FILE).exists()
        assert _scfrisk(["server", "status"], env).returncode == 1
    finally:
        for pid in _marked(mark):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_removing_the_workspace_stops_its_server(tmp_path):
    home, mark = tmp_path / "home", uuid.uuid4().hex
    env = {**_env(home, mark), "SCFRISK_PREFECT__CHECK_SECONDS": "0.5"}  # the default idle time: an hour
    try:
        started = _scfrisk(["server", "start"], env)
        assert started.returncode == 0 and _marked(mark), started.stderr
        shutil.rmtree(home)
        assert _ended(mark), "the server of a removed workspace kept running"
    finally:
        for pid in _marked(mark):
            os.kill(pid, signal.SIGKILL)
