"""Real brokers as child processes, for the test harness, the benchmarks and the demo.

* :class:`MosquittoBroker` runs Debian's ``mosquitto`` on a free loopback port with a temp config.
* :class:`EmbeddedBroker` runs the pure-Python ``amqtt`` broker in a background thread, for
  machines without Mosquitto (the demo on a laptop).
* :class:`KafkaBroker` runs Apache Kafka 3.9.1 in KRaft mode (one node, broker + controller)
  from the Maven Central jars that ``scripts/install-test-deps.sh`` puts in the cache folder.
* :class:`PostgresServer` runs Debian's PostgreSQL (a fresh cluster) for central's registry tests.

Every service has ``start()``, ``stop()``, ``host``/``port``, works as a context manager, and
raises :class:`ServiceUnavailable` when what it needs is not installed, or :class:`ServiceError`
(with the tail of its log) when it does not come up in time.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, Protocol, Self

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
KAFKA_VERSION = "3.9.1"


class ServiceError(RuntimeError):
    """A service did not start or stop as it should."""


class ServiceUnavailable(ServiceError):
    """What a service needs (a binary, the Kafka jars) is not installed on this machine."""


class MqttBroker(Protocol):
    """What :func:`start_mqtt_broker` returns."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


# ------------------------------------------------------------------ helpers


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def scrape_metrics(port: int, host: str = LOOPBACK, timeout: float = 5.0) -> dict[str, float]:
    """A Prometheus endpoint's samples as ``{'name{labels}': value}``; empty while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


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

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ Mosquitto


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



# ------------------------------------------------------------------ amqtt


class EmbeddedBroker:
    """The pure-Python ``amqtt`` broker on ``127.0.0.1:<port>``, in a background daemon thread.

    For machines without Mosquitto. MQTT 3.1.1, QoS 0-2, retained messages, last-wills, anonymous
    access. Sessions and retained messages live in memory and are gone after :meth:`stop`.

    Limitation (amqtt 0.12): with anonymous access every session counts as anonymous, and amqtt
    does not queue QoS 1 messages for an anonymous ``clean_session=False`` client while it is
    offline. Good enough for the demo; outage and redelivery tests need :class:`MosquittoBroker`.
    """

    def __init__(self, port: int | None = None, *, start_timeout: float = 10.0) -> None:
        self._requested_port = port
        self._port = port or 0
        self.start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> None:
        return None  # runs in this process

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.host}:{self.port}, running={self.running})"

    def start(self) -> None:
        """Start the broker thread and wait until its port accepts connections."""
        if self.running:
            return
        try:
            from amqtt.broker import Broker  # noqa: F401 - fail here, not in the thread
        except ImportError as exc:
            raise ServiceUnavailable(f"amqtt is not installed: {exc}") from exc
        # amqtt's state machine library logs every transition at INFO; keep it quiet unless asked.
        transitions_log = logging.getLogger("transitions")
        if transitions_log.level == logging.NOTSET:
            transitions_log.setLevel(logging.WARNING)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="mqtt:embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise ServiceError(f"embedded MQTT broker did not start within {self.start_timeout:.1f} s")
        if self._error is not None:
            self._thread.join(timeout=5)
            self._thread = None
            raise ServiceError(f"embedded MQTT broker failed to start: {self._error!r}") from self._error
        # No port probe: the listener is bound once Broker.start() has returned, and amqtt logs an
        # ERROR for every connection that closes without a CONNECT packet.
        log.info("embedded MQTT broker (amqtt) up on %s:%d", self.host, self._port)

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{self._port}"}},
            # Only anonymous auth: no $SYS publisher, no per-packet logging.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _astart(self) -> None:
        from amqtt.broker import Broker

        self._broker = Broker(self._config())
        await self._broker.start()
        if self._port == 0:
            # Bound to port 0: read back the port the OS chose, and keep it for restarts.
            server = self._broker._servers["default"].instance  # noqa: SLF001 - amqtt has no public accessor
            self._port = int(server.sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (closing client sessions) and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - a failed shutdown still ends the loop below
                log.warning("embedded MQTT broker: shutdown failed", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("embedded MQTT broker thread did not end within %.0f s", timeout)
        self._thread = None
        self._broker = None

    def restart(self) -> None:
        """Stop and start again on the same port (in-memory state is lost)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mqtt_broker(prefer_mosquitto: bool = True, port: int | None = None) -> MosquittoBroker | EmbeddedBroker:
    """A started MQTT broker: Mosquitto when installed (and preferred), else the embedded one."""
    if prefer_mosquitto and mosquitto_path() is not None:
        mosquitto = MosquittoBroker(port=port)
        try:
            mosquitto.start()
            return mosquitto
        except ServiceError:
            log.warning("mosquitto failed to start; falling back to the embedded broker", exc_info=True)
            mosquitto.stop()
    broker = EmbeddedBroker(port=port)
    broker.start()
    return broker


# ------------------------------------------------------------------ Kafka


def edgeline_cache_dir() -> Path:
    """``$EDGELINE_CACHE``, default ``~/.cache/edgeline`` (install-test-deps.sh uses the same)."""
    return Path(os.environ.get("EDGELINE_CACHE") or Path.home() / ".cache" / "edgeline")


def kafka_lib_dir() -> Path | None:
    """The folder of Kafka jars: ``$EDGELINE_KAFKA_LIB``, else ``<cache>/kafka-3.9.1/lib``; None if absent."""
    override = os.environ.get("EDGELINE_KAFKA_LIB")
    candidate = Path(override) if override else edgeline_cache_dir() / f"kafka-{KAFKA_VERSION}" / "lib"
    if candidate.is_dir() and any(candidate.glob("kafka_2.13-*.jar")):
        return candidate
    return None


def java_path() -> str | None:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'
    (the storage tool would read that as an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


_LOG4J = """\
# written by edgeline.services.KafkaBroker: everything to {log}, nothing on the console
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.Append=true
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.kafka.authorizer.logger=WARN
"""


class KafkaBroker(_ChildProcessService):
    """One Apache Kafka 3.9.1 node in KRaft mode (broker + controller) on loopback ports.

    ``workdir`` holds ``server.properties``, ``log4j.properties``, the data (``data/``) and the
    logs (``kafka.log``, ``console.log``). The data folder is formatted once; a second
    :meth:`start` on the same workdir reuses it (topics and offsets survive :meth:`restart`).

    :meth:`start` returns once the broker answers a metadata request from a real client.

    ``fast_start`` runs the JVM with the C1 JIT only (``-XX:TieredStopAtLevel=1``): about 2.6 s
    instead of 3.5-4.5 s to a ready broker on a 2-core box, and no C2 compile threads competing
    with the tests for CPU, at the price of lower peak throughput. Benchmarks pass ``False``.
    """

    name = "kafka"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        controller_port: int | None = None,
        *,
        lib_dir: Path | None = None,
        heap: str = "512m",
        fast_start: bool = True,
        start_timeout: float = 90.0,
        stop_timeout: float = 20.0,
        extra_properties: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self._port = port if port is not None else free_port()
        self._controller_port = controller_port if controller_port is not None else free_port()
        while self._controller_port == self._port:
            self._controller_port = free_port()
        self._lib_dir = Path(lib_dir) if lib_dir is not None else None
        self.heap = heap
        self.fast_start = fast_start
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.extra_properties = dict(extra_properties or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def controller_port(self) -> int:
        return self._controller_port

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap_servers`` string for clients."""
        return f"{LOOPBACK}:{self._port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "kafka.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap}, pid={self.pid})"

    def properties(self) -> dict[str, str]:
        cport = self._controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{cport}",
            "listeners": f"PLAINTEXT://{LOOPBACK}:{self._port},CONTROLLER://{LOOPBACK}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "4",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # 50 partitions by default; a few are plenty for one node and make the first group join faster.
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            # A small box: few threads, small index files.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "background.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.index.size.max.bytes": "1048576",
            "log.retention.check.interval.ms": "300000",
        }
        props.update(self.extra_properties)
        return props

    def _java_base(self, java: str, lib: Path, log4j: Path) -> list[str]:
        return [
            java,
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp",
            f"{lib}/*",
        ]

    def start(self) -> None:
        """Format the data folder if needed, start the node, and wait until it serves metadata."""
        if self.running:
            return
        lib = self._lib_dir or kafka_lib_dir()
        if lib is None:
            where = os.environ.get("EDGELINE_KAFKA_LIB") or edgeline_cache_dir() / f"kafka-{KAFKA_VERSION}" / "lib"
            raise ServiceUnavailable(
                f"Kafka {KAFKA_VERSION} jars not found in {where} "
                "(run scripts/install-test-deps.sh, or set EDGELINE_KAFKA_LIB to a folder of the jars)"
            )
        java = java_path()
        if java is None:
            raise ServiceUnavailable("java is not installed (Kafka needs Java 11+; apt-get install default-jre-headless)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        server_props = self.workdir / "server.properties"
        server_props.write_text(
            "# written by edgeline.services.KafkaBroker\n" + "".join(f"{k}={v}\n" for k, v in self.properties().items())
        )
        log4j = self.workdir / "log4j.properties"
        log4j.write_text(_LOG4J.format(log=self.log_path))
        started = time.monotonic()
        base = self._java_base(java, lib, log4j)
        if not (self.data_dir / "meta.properties").exists():
            self._format(base, server_props)
        self._console = open(self.workdir / "console.log", "ab")  # noqa: SIM115 - closed in _stop_process()
        self._proc = _spawn(
            [
                *base[:1],
                f"-Xmx{self.heap}",
                "-Xms256m",
                "-XX:+UseSerialGC",
                "-XX:+ExitOnOutOfMemoryError",
                *(["-XX:TieredStopAtLevel=1"] if self.fast_start else []),
                *base[1:],
                "kafka.Kafka",
                str(server_props),
            ],
            self._console,
            self.workdir,
        )
        try:
            self._wait_ready(started + self.start_timeout)
        except BaseException as exc:
            self._stop_process(timeout=5)
            if isinstance(exc, ServiceError):
                raise
            raise ServiceError(f"Kafka did not become ready: {exc!r}\n{self._log_report()}") from exc
        self.startup_seconds = time.monotonic() - started
        log.info("Kafka %s up on %s in %.1f s (pid %d)", KAFKA_VERSION, self.bootstrap, self.startup_seconds, self._proc.pid)

    def _format(self, base: list[str], server_props: Path) -> None:
        cmd = [
            *base[:1],
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # a short-lived tool: the C1 compiler alone starts faster
            *base[1:],
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(),
            "-c",
            str(server_props),
        ]
        done = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
        if done.returncode != 0:
            raise ServiceError(
                f"kafka StorageTool format failed with code {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )

    def _log_report(self) -> str:
        return f"--- {self.log_path}\n{tail(self.log_path)}\n--- {self.workdir / 'console.log'}\n{tail(self.workdir / 'console.log')}"

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        try:
            wait_for_port(self.host, self._port, max(0.1, deadline - time.monotonic()), proc=self._proc, interval=0.1)
        except (TimeoutError, ServiceError) as exc:
            raise ServiceError(f"Kafka did not open {self.bootstrap}: {exc}\n{self._log_report()}") from exc
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceError(f"Kafka exited with code {self._proc.returncode}\n{self._log_report()}")
            try:
                if self._metadata_ok():
                    return
            except Exception as exc:  # noqa: BLE001 - not ready yet; retried until the deadline
                last = exc
            time.sleep(0.2)
        raise ServiceError(f"Kafka at {self.bootstrap} did not answer metadata requests in time (last error: {last!r})\n{self._log_report()}")

    def _metadata_ok(self) -> bool:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id="edgeline-services-probe",
            request_timeout_ms=5000,
            bootstrap_timeout_ms=5000,
        )
        try:
            cluster = admin.describe_cluster()
            return any(int(b.get("broker_id", -1)) == 1 for b in cluster.get("brokers", []))
        finally:
            admin.close()

    def stop(self) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL after ``stop_timeout`` s. The workdir is kept."""
        self._stop_process()



__all__ = [
    "EmbeddedBroker",
    "KafkaBroker",
    "MosquittoBroker",
    "MqttBroker",
    "ServiceError",
    "ServiceUnavailable",
    "edgeline_cache_dir",
    "free_port",
    "java_path",
    "kafka_lib_dir",
    "mosquitto_path",
    "port_open",
    "start_mqtt_broker",
    "tail",
    "wait_for_port",
]


# ------------------------------------------------------------------ PostgreSQL


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
