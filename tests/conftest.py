"""The test harness: real brokers once per session, fresh names per test, and a leak guard.

Fixtures:

* ``mosquitto`` (session): a :class:`edgeline.services.MosquittoBroker` on a free loopback port.
* ``restartable_mosquitto`` (function): a broker of the test's own that it may stop and restart
  (same port, persistent sessions), for outage tests.
* ``kafka`` (session): a :class:`edgeline.services.KafkaBroker` (KRaft, one node); ``kafka.bootstrap``.
* ``unique_name`` (function): a fresh prefix for topics, consumer groups and client ids.
* ``data_dir`` (function): the shared data folder (``$EDGELINE_DATA``, default ``<repo>/../shared/data``).
* ``mqtt_probe`` (function): a factory of :class:`MqttProbe` test clients (paho-mqtt 2), all
  disconnected after the test.

A service that is not installed or does not start skips the tests that need it, with the reason;
with ``EDGELINE_REQUIRE_SERVICES=1`` (CI) it fails them instead.

Every test is checked for leaks: threads (daemon or not) or child processes that it started and
that are still alive after it (with a short grace period) fail it.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeline.services import KafkaBroker, MosquittoBroker, PostgresServer, ServiceError
import stream.service as service_module

REPO_ROOT = Path(__file__).resolve().parent.parent
LEAK_GRACE_S = 3.0
"""How long the threads and child processes a test started get to end after it."""

# Processes of session-scoped services (they may be restarted by a test, so pids are read late).
_session_services: list[MosquittoBroker | KafkaBroker | PostgresServer] = []


def services_required() -> bool:
    return os.environ.get("EDGELINE_REQUIRE_SERVICES", "").strip().lower() in {"1", "true", "yes"}


def service_unavailable(reason: str) -> None:
    """Skip the test, or fail it when services are required (a skip in CI is a failure)."""
    if services_required():
        pytest.fail(f"{reason} (EDGELINE_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------ brokers


def _serve_for_session(broker: MosquittoBroker | KafkaBroker | PostgresServer, name: str) -> Iterator[Any]:
    """Start a broker for the whole session (skip, or fail under EDGELINE_REQUIRE_SERVICES), then stop it."""
    try:
        broker.start()
    except ServiceError as exc:
        broker.stop()
        problem = f"{name} unavailable: {exc}"
    else:
        problem = None
    if problem is not None:
        service_unavailable(problem)
    _session_services.append(broker)
    try:
        yield broker
    finally:
        _session_services.remove(broker)
        broker.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A Mosquitto broker on 127.0.0.1:<free port>, shared by the whole session."""
    yield from _serve_for_session(MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto")), "Mosquitto")


@pytest.fixture
def restartable_mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of this test's own, which it may stop and start again (same port; sessions and
    queued messages persisted), for outage tests."""
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", persistence=True)
    try:
        broker.start()
    except ServiceError as exc:
        broker.stop()
        service_unavailable(f"Mosquitto unavailable: {exc}")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """An Apache Kafka 3.9.1 node (KRaft) on 127.0.0.1:<free port>, shared by the whole session."""
    yield from _serve_for_session(KafkaBroker(tmp_path_factory.mktemp("kafka")), "Kafka")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server (a fresh cluster) on 127.0.0.1:<free port>, shared by the whole session."""
    yield from _serve_for_session(PostgresServer(), "PostgreSQL")


# ------------------------------------------------------------------ per-test helpers


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A fresh name for this test: ``t-<test name, shortened>-<8 hex>``.

    Valid as a Kafka topic, consumer group, MQTT topic level and client-id prefix; append your
    own suffix (``f"{unique_name}.results"``) when a test needs several.
    """
    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_")).strip("-")[:24].strip("-")
    return f"t-{stem or 'x'}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder; the test is skipped (never failed) when it is absent."""
    path = Path(os.environ.get("EDGELINE_DATA") or REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"data folder {path} not found (set EDGELINE_DATA)")
    return path


# ------------------------------------------------------------------ MQTT test client


class MqttProbe:
    """A paho-mqtt 2 test client (MQTT 3.1.1) that records what it receives.

    ``start()`` connects and runs paho's network thread; ``subscribe()`` waits for the SUBACK;
    ``publish()`` waits for the PUBACK (QoS 1); ``get()``/``expect()`` take received messages.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        clean_session: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
        keepalive: int = 10,
    ) -> None:
        self.host, self.port, self.client_id, self.keepalive = host, port, client_id, keepalive
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=paho.MQTTv311
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.connects = 0
        self.session_present = False
        self._subacks: dict[int, list[int]] = {}
        self._suback_event = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if not reason_code.is_failure:
            self.connects += 1
            self.session_present = bool(flags.session_present)
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.connected.clear()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        self.messages.put(message)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        with self._suback_event:
            self._subacks[mid] = [int(rc.value) for rc in reason_codes]
            self._suback_event.notify_all()

    def start(self, timeout: float = 10.0) -> MqttProbe:
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        self.wait_connected(timeout)
        return self

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.connected.wait(timeout):
            raise TimeoutError(f"{self.client_id}: not connected to {self.host}:{self.port} within {timeout} s")

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted QoS per filter (128 = refused)."""
        result, mid = self.client.subscribe(topic, qos=qos)
        if result != paho.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"{self.client_id}: subscribe {topic!r} failed: {paho.error_string(result)}")
        with self._suback_event:
            if not self._suback_event.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"{self.client_id}: no SUBACK for {topic!r} within {timeout} s")
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, timeout: float = 10.0) -> None:
        """Publish and, for QoS > 0, wait until the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise TimeoutError(f"{self.client_id}: no PUBACK for {topic!r} within {timeout} s")

    def get(self, timeout: float = 10.0) -> paho.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.client_id}: no message within {timeout} s") from None

    def expect(self, count: int, timeout: float = 10.0) -> list[paho.MQTTMessage]:
        """Exactly the next ``count`` messages, waiting up to ``timeout`` s in all."""
        deadline = time.monotonic() + timeout
        got = []
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.client_id}: got {len(got)} of {count} messages within {timeout} s")
            got.append(self.get(remaining))
        return got

    def stop(self) -> None:
        """Disconnect cleanly (no last-will) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def edge_site(broker: Any, site: str, tmp_path: Path, machines: list[dict[str, Any]], models: dict[str, Any],
              **sections: Any) -> Any:
    """A site for in-process edge agents: ``broker``, outboxes under ``tmp_path``, metrics on free
    ports, plus any other top-level ``sections``."""
    from edgeline.config import from_dict

    return from_dict({
        "site": site, "broker": {"host": broker.host, "port": broker.port}, "models": models, "machines": machines,
        "outbox": {"path": str(tmp_path / "{machine}.sqlite")}, "metrics": {"port": 0}, **sections,
    }, base_dir=tmp_path)


@pytest.fixture
def mqtt_probe(unique_name: str) -> Iterator[Callable[..., MqttProbe]]:
    """``mqtt_probe(broker, suffix="", **kw)`` → a started :class:`MqttProbe` named after the test."""
    probes: list[MqttProbe] = []

    def make(broker: Any, suffix: str = "", *, start: bool = True, **kwargs: Any) -> MqttProbe:
        probe = MqttProbe(broker.host, broker.port, f"{unique_name}-{suffix or len(probes)}", **kwargs)
        probes.append(probe)
        return probe.start() if start else probe

    yield make
    for probe in probes:
        probe.stop()


# ------------------------------------------------------------------ markers

FOLDER_MARKERS = {"integration": REPO_ROOT / "tests" / "integration", "e2e": REPO_ROOT / "tests" / "e2e"}
"""Every test under each folder carries its marker, so that ``-m "not integration"`` leaves out
every test that needs a broker."""


def unmarked_tests(items: list[pytest.Item]) -> list[str]:
    """``path (marker)`` of each test file under a folder of :data:`FOLDER_MARKERS` with a test
    that lacks the folder's marker."""
    return sorted({f"{item.path.relative_to(REPO_ROOT)} (add: pytestmark = pytest.mark.{marker})"
                   for item in items for marker, folder in FOLDER_MARKERS.items()
                   if item.path.is_relative_to(folder) and item.get_closest_marker(marker) is None})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stop the run when a test misses its folder's marker (see :data:`FOLDER_MARKERS`)."""
    unmarked = unmarked_tests(items)
    if unmarked:
        raise pytest.UsageError("tests without their folder's marker:\n  " + "\n  ".join(unmarked))


# ------------------------------------------------------------------ supervision


@pytest.fixture(autouse=True)
def supervisors_may_not_give_up(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A supervisor that gives up with its default action signals the main thread to end the
    process, which would end the whole pytest run; here it fails the test instead. Tests of the
    give-up pass their own ``on_give_up`` or run it in a child process."""
    gave_up: list[str] = []
    monkeypatch.setattr(service_module, "exit_process",
                        lambda service, exc: gave_up.append(f"{service}: {type(exc).__name__}: {exc}"))
    yield
    if gave_up:
        pytest.fail("a supervisor gave up on a loop that kept crashing:\n  " + "\n  ".join(gave_up), pytrace=False)


# ------------------------------------------------------------------ leak guard


def _service_pids() -> set[int]:
    return {svc.pid for svc in _session_services if svc.pid is not None}


def _live_children() -> dict[int, psutil.Process]:
    """Child processes of this process that are still running (zombies do not count)."""
    alive: dict[int, psutil.Process] = {}
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return alive
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive[child.pid] = child
        except psutil.Error:
            continue
    return alive


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid}"


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    """Fail a test that leaves threads or child processes behind.

    Daemon threads count too: every long-running thread the project starts is a daemon that its
    owner's ``stop()`` must end (every supervised loop is named ``<service>/<loop>``: ``capture:m1/c1``,
    ``vision:m1/infer``, ``sensing:m1/step``, ``heartbeat:m1/publish``, ``ota:m1/apply``,
    ``outbox:m1/forward``, ``bridge:<site>/retry``, ``rollouts:<site>/tick``; and ``mqtt:embedded-broker``),
    and so are the ones its libraries start for it (paho's ``paho-mqtt-client-*``, kafka-python's
    ``kafka-io-*`` and ``*-network-thread``, prometheus_client's ``serve_forever``). Matching all
    threads rather than a list of names keeps a new thread from slipping past."""
    threads_before = set(threading.enumerate())
    children_before = set(_live_children())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        excluded = children_before | _service_pids()
        children = {pid: p for pid, p in _live_children().items() if pid not in excluded}
        # Descendants of the session brokers (none today) are theirs, not the test's.
        children = {
            pid: p for pid, p in children.items() if not any(a.pid in excluded for a in _safe_parents(p))
        }
        if not threads and not children:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    problems = [f"thread {t.name!r} ({'daemon' if t.daemon else 'non-daemon'}) still alive" for t in threads]
    problems += [f"child process still running: {_describe(p)}" for p in children.values()]
    for proc in children.values():  # so that the next test is not blamed for them
        try:
            proc.kill()
        except psutil.Error:
            pass
    pytest.fail("test leaked:\n  " + "\n  ".join(problems), pytrace=False)


def _safe_parents(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.parents()
    except psutil.Error:
        return []
