"""Debian's PostgreSQL (a fresh cluster) as a child process, for central's registry tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import IO

from edgeline.services.process import (LOOPBACK, ServiceError, ServiceUnavailable, _ChildProcessService, _Workdir,
                                       free_port, tail, wait_for_port)


def postgres_bindir() -> Path | None:
    """Debian's PostgreSQL server binaries (``/usr/lib/postgresql/<major>/bin``, the newest), or
    the folder of ``initdb`` on PATH."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0) if found else None


class PostgresServer(_ChildProcessService):
    """PostgreSQL on ``127.0.0.1:<port>`` as a child process: a fresh cluster in a temp folder
    (trust authentication, loopback only, fsync off), removed by :meth:`stop`. PostgreSQL will
    not run as root, so as root it runs as Debian's ``postgres`` user, in a folder that user owns.
    :meth:`new_database` gives each test a database of its own."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for every client to leave

    def __init__(self, port: int | None = None, start_timeout: float = 30.0) -> None:
        self._port = port if port is not None else free_port()
        self._workdir = _Workdir(None, "edgeline-postgres-")
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._workdir.path / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self._port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"edgeline_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=LOOPBACK, port=self._port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run_as(self) -> str | None:
        return "postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None

    def start(self) -> None:
        if self.running:
            return
        bindir = postgres_bindir()
        if bindir is None:
            raise ServiceUnavailable("PostgreSQL is not installed (apt-get install postgresql, or "
                                     "scripts/install-test-deps.sh)")
        workdir, user = self._workdir.path, self._run_as()
        data = workdir / "data"
        if user is not None:
            shutil.chown(workdir, user)
        if not data.exists():
            done = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                   "-E", "UTF8", "--no-sync"], cwd=workdir, user=user, capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                raise ServiceError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        self._console = open(self.log_path, "ab")  # noqa: SIM115 - closed in _stop_process()
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argument list
            [str(bindir / "postgres"), "-D", str(data), "-p", str(self._port), "-k", str(workdir),
             "-c", f"listen_addresses={LOOPBACK}", "-c", "fsync=off", "-c", "full_page_writes=off"],
            cwd=workdir, user=user, stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.host, self._port, self.start_timeout, proc=self._proc)
        except (TimeoutError, ServiceError) as exc:
            self._stop_process()
            raise ServiceError(f"postgres did not start on {self.host}:{self._port}: {exc}\n{tail(self.log_path)}") from exc

    def stop(self) -> None:
        self._stop_process()
        self._workdir.cleanup()
