"""The child-process base of the harness: ports, waiting for them, spawning and stopping a
process that dies with the test run, and the tail of its log for error messages.

Every service has ``start()``, ``stop()``, ``host``/``port``, works as a context manager, and
raises :class:`ServiceUnavailable` when what it needs is not installed, or :class:`ServiceError`
(with the tail of its log) when it does not come up in time.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, Self

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service did not start or stop as it should."""


class ServiceUnavailable(ServiceError):
    """What a service needs (a binary, the Kafka jars) is not installed on this machine."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    proc: subprocess.Popen[Any] | None = None,
    interval: float = 0.05,
) -> None:
    """Block until ``host:port`` accepts connections.

    Raises :class:`TimeoutError` after ``timeout`` seconds, or :class:`ServiceError` as soon as
    ``proc`` (the process that should open the port) has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"process {proc.pid} exited with code {proc.returncode} before {host}:{port} opened")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout:.1f} s")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child when the thread that forked it exits, so a killed test run
    leaves no broker behind. Only used when forking from the main thread (see :func:`_spawn`)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _spawn(args: list[str], log_file: IO[bytes], cwd: Path) -> subprocess.Popen[bytes]:
    # PDEATHSIG fires when the forking *thread* ends, so only arm it from the main thread.
    arm = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
    return subprocess.Popen(  # noqa: S603 - fixed argument lists
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if arm else None,  # noqa: PLW1509
    )


def _terminate(proc: subprocess.Popen[Any], name: str, timeout: float, sig: int = signal.SIGTERM) -> None:
    """``sig`` (SIGTERM), wait up to ``timeout`` s, then SIGKILL; always reaps the process."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored signal %d for %.0f s; killing it", name, proc.pid, sig, timeout)
        proc.kill()
        proc.wait(timeout=10)


class _Workdir:
    """A working folder: the caller's, or a temp folder owned (and removed) by the service."""

    def __init__(self, workdir: Path | None, prefix: str) -> None:
        self._given = Path(workdir) if workdir is not None else None
        self._prefix = prefix
        self._owned: Path | None = None

    @property
    def path(self) -> Path:
        if self._given is not None:
            self._given.mkdir(parents=True, exist_ok=True)
            return self._given
        if self._owned is None or not self._owned.exists():
            self._owned = Path(tempfile.mkdtemp(prefix=self._prefix))
        return self._owned

    def cleanup(self) -> None:
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)
            self._owned = None


class _ChildProcessService(ABC):
    """Shared by the brokers that run as child processes: crash, restart, logs, context manager."""

    _proc: subprocess.Popen[bytes] | None
    _console: IO[bytes] | None
    _port: int
    name: str
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 10.0

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    @abstractmethod
    def log_path(self) -> Path: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    def _stop_process(self, timeout: float | None = None) -> None:
        """Stop the process (``stop_signal``, SIGKILL after ``stop_timeout`` s) and close its console log."""
        if self._proc is not None:
            _terminate(self._proc, self.name, self.stop_timeout if timeout is None else timeout, self.stop_signal)
            self._proc = None
        if self._console is not None:
            self._console.close()
            self._console = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def kill(self) -> None:
        """Crash the service (SIGKILL): no clean disconnects, no state saved on the way out."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._stop_process()

    def restart(self) -> None:
        """Stop and start again on the same port(s), with the same data folder."""
        self._stop_process()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
