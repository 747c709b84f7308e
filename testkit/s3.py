"""A local S3-compatible server for tests and benchmarks: moto's, in a child process on a free loopback port.

A child process, not a thread: delta-rs holds the GIL while it waits on a request, so a server thread in the
caller's process would never answer. Credentials and endpoint reach the stores through the usual `AWS_*`
variables (`S3Server.environment`), as on real S3.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    pid: int
    """The server's process (for its CPU time in a benchmark)."""

    def environment(self) -> dict[str, str]:
        """What a client needs besides the bucket (moto accepts any key)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server until the block ends; `RuntimeError` if it does not answer within 30 s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto's S3 server did not start within 30 s")
        yield S3Server(url, server.pid)
    finally:
        server.terminate()
        server.wait()
