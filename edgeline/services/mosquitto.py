"""Debian's ``mosquitto`` as a child process on a free loopback port with a temp config."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

from edgeline.services.process import (LOOPBACK, ServiceError, ServiceUnavailable, _ChildProcessService, _spawn,
                                       _Workdir, free_port, tail, wait_for_port)

log = logging.getLogger(__name__)


def mosquitto_path() -> str | None:
    """The ``mosquitto`` binary: on PATH, else Debian's ``/usr/sbin/mosquitto``, else None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class MosquittoBroker(_ChildProcessService):
    """Mosquitto on ``127.0.0.1:<port>`` as a child process: anonymous access, or with
    ``password_file`` (and ``acl_file``) only the users it lists, within their ACL.

    ``port`` defaults to a free port chosen once, so :meth:`restart` comes back on the same port
    (outage tests). With ``persistence=True`` the broker keeps sessions and queued QoS 1 messages
    in ``persistence_dir`` (default: the work folder) across restarts; it saves them on a clean
    stop. ``workdir`` holds the config and ``mosquitto.log``; a temp folder is used (and removed by
    :meth:`stop`) when none is given.
    """

    name = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        *,
        persistence: bool = False,
        persistence_dir: Path | None = None,
        max_queued_messages: int = 100_000,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self._port = port if port is not None else free_port()
        self._workdir = _Workdir(workdir, "edgeline-mosquitto-")
        self.password_file = password_file
        self.acl_file = acl_file
        self.persistence = persistence
        self.persistence_dir = persistence_dir
        self.max_queued_messages = max_queued_messages
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None

    @property
    def workdir(self) -> Path:
        return self._workdir.path

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.host}:{self.port}, pid={self.pid})"

    def _auth_lines(self) -> list[str]:
        if self.password_file is None:
            return ["allow_anonymous true"]
        lines = ["allow_anonymous false", f"password_file {self.password_file}"]
        return lines + ([f"acl_file {self.acl_file}"] if self.acl_file is not None else [])

    def _config(self, workdir: Path) -> str:
        lines = [
            "# written by edgeline.services.MosquittoBroker",
            f"listener {self._port} {LOOPBACK}",
            *self._auth_lines(),
            f"log_dest file {workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            # Offline persistent sessions (bridge outage tests) may queue many QoS 1 messages.
            f"max_queued_messages {self.max_queued_messages}",
            # A bridge acknowledges only after Kafka has: allow many unacknowledged messages per client.
            "max_inflight_messages 1000",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, mosquitto drops to user "mosquitto", which cannot write into our temp dirs.
            lines.append("user root")
        if self.persistence:
            location = Path(self.persistence_dir) if self.persistence_dir is not None else workdir
            location.mkdir(parents=True, exist_ok=True)
            lines += ["persistence true", f"persistence_location {location}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            return
        binary = mosquitto_path()
        if binary is None:
            raise ServiceUnavailable("mosquitto is not installed (apt-get install mosquitto, or scripts/install-test-deps.sh)")
        workdir = self.workdir
        conf = workdir / "mosquitto.conf"
        conf.write_text(self._config(workdir))
        self._console = open(workdir / "mosquitto.console.log", "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self._proc = _spawn([binary, "-c", str(conf)], self._console, workdir)
        try:
            wait_for_port(self.host, self._port, self.start_timeout, proc=self._proc)
        except (TimeoutError, ServiceError) as exc:
            self._stop_process()
            raise ServiceError(
                f"mosquitto did not start on {self.host}:{self._port}: {exc}\n"
                f"--- {self.log_path}\n{tail(self.log_path)}\n"
                f"--- console\n{tail(workdir / 'mosquitto.console.log')}"
            ) from exc
        log.info("mosquitto up on %s:%d in %.2f s (pid %d)", self.host, self._port, time.monotonic() - started, self._proc.pid)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 10 s) and remove an owned temp folder."""
        self._stop_process()
        self._workdir.cleanup()
