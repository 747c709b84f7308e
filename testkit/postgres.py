"""A throwaway PostgreSQL cluster for tests and benchmarks: Debian's server binaries, `initdb` into a
temporary folder, `pg_ctl` on a free loopback port, password authentication over TCP (so a wrong password
is really refused), stopped and removed at the end.

`initdb` refuses to run as root: as root the cluster belongs to the `postgres` user (its folder is created
outside any private temporary folder, so that user can enter it); as anyone else it is the caller's.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

USER = "scfrisk"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (`make test` installs Debian's `postgresql`)."""


def server_bin() -> Path:
    """The folder of `initdb` and `pg_ctl`: on the PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        raise PostgresUnavailable("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql; "
                                  "`make test` does it)")
    return Path(candidates[-1]).parent


def cluster_owner() -> pwd.struct_passwd | None:
    """The user the cluster runs as when the caller is root (`initdb` refuses root); None: the caller."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("initdb refuses to run as root, and there is no postgres user to run it as "
                                  "(Debian's postgresql package creates one)") from None


@dataclass(frozen=True)
class Cluster:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres", password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL (with the password)."""
        import adbc_driver_postgresql.dbapi

        with adbc_driver_postgresql.dbapi.connect(self.url(), autocommit=True) as connection:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def cluster() -> Iterator[Cluster]:
    """A running cluster, stopped and its folder removed on exit, whatever happened in between."""
    bin_, owner = server_bin(), cluster_owner()
    root = Path(tempfile.mkdtemp(prefix="scfrisk-pg-", dir="/tmp"))
    password = secrets.token_hex(12)
    (root / "pw").write_text(password + "\n")
    if owner is not None:
        root.chmod(0o700)
        for path in (root, root / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def run(*args: str) -> None:
        command = [str(bin_ / args[0]), *args[1:]]
        if owner is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = root / "log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")

    data = root / "data"
    started = False
    try:
        run("initdb", "-D", str(data), "-U", USER, f"--pwfile={root / 'pw'}", "--auth-host=scram-sha-256",
            "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        (root / "pw").unlink()
        port = _free_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=20 -c shared_buffers=32MB")
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start")
        started = True
        yield Cluster("127.0.0.1", port, USER, password)
    finally:
        try:
            if started:
                run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
