"""Apache Kafka 3.9.1 in KRaft mode (one node, broker + controller) as a child process, from the
Maven Central jars that ``scripts/install-test-deps.sh`` puts in the cache folder."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO

from edgeline.services.process import (LOOPBACK, ServiceError, ServiceUnavailable, _ChildProcessService, _spawn,
                                       free_port, tail, wait_for_port)

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"


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
