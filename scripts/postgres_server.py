"""A private PostgreSQL server in a temporary folder, for tests and benchmarks.

``PostgresServer()`` finds Debian's PostgreSQL binaries (``initdb`` on the PATH, else
``/usr/lib/postgresql/*/bin``), makes a cluster with ``initdb`` in a fresh temporary folder and
runs it with ``pg_ctl`` on a free loopback port, its Unix socket in that folder too (so nothing
outside the folder is touched). PostgreSQL refuses to run as root: when we are root, the folder
is handed to the ``postgres`` user (Debian's package creates it) and every server command runs
as that user. Authentication is ``trust`` on loopback only; the superuser is ``tmg``.

    with PostgresServer() as server:
        url = server.create_database()     # postgresql://tmg@127.0.0.1:PORT/tmg_1
        server.stop(); server.start()      # a restart on the same port and data

``python scripts/postgres_server.py`` starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

SUPERUSER = "tmg"
UNPRIVILEGED_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed, or the server would not start."""


def find_bin_dir() -> Path:
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL's server is not installed (no initdb): `make setup` installs Debian's "
            "postgresql package, or point TMG_TEST_POSTGRES_URL at a server"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder (see the module docstring)."""

    def __init__(self, *, port: int | None = None) -> None:
        self.bin_dir = find_bin_dir()
        self.port = port or free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="tmg-postgres-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:  # the server refuses root: run it as the unprivileged user
            account = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self._user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self._databases = itertools.count(1)
        self.running = False
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200"
        )
        try:
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            )
        except PostgresUnavailable as error:
            raise PostgresUnavailable(f"{error}\n{self.log.read_text(errors='replace')}") from None
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self.running = False
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster (its backends exit when they notice)."""
        pid_file = self.data / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        self.running = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"tmg_{next(self._databases)}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [str(self.bin_dir / program), *args],
            cwd=self.folder,
            capture_output=True,
            text=True,
            check=False,
            **self._user,
        )
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{program} exited {done.returncode}: {done.stderr.strip() or done.stdout}"
            )


def main() -> None:
    with PostgresServer() as server:
        print(server.create_database(), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    sys.exit(0)


if __name__ == "__main__":
    main()
