"""The MQTT -> Kafka bridge, and Kafka commands back to the edge.

Inbound: one persistent MQTT session (clean_session=False, QoS 1, manual acks) subscribed to
everything a site's machines publish. Each message is validated and produced to the Kafka topic of
its kind, keyed by machine (so one machine's messages stay ordered on one partition), with the
capture time as the record timestamp. The MQTT message is acknowledged only after Kafka has
acknowledged the record (idempotent producer, acks=all), and acknowledgements go out in the order
the messages came in. If the bridge dies in between, the broker redelivers to the same session;
consumers dedupe on ``msg_id``. A record Kafka refuses is retried with backoff, never dropped.

Messages that fail validation (bad JSON, schema, topic/body mismatch) go to
``<prefix>.deadletter`` with the reason, are counted, and are acknowledged. A machine's retained
``status`` (``online``/``offline``, the last-will) becomes an :class:`Event`
(``machine_online``/``machine_offline``) on ``<prefix>.events`` for fleet liveness.

Outbound: ``<prefix>.commands`` (consumer group ``edgeline-bridge-<site>``) is published to each
machine's MQTT command topic at QoS 1; a record's offset is committed only after the broker's
PUBACK.

Threads: paho's network loop (``mqtt:edgeline-bridge-<site>``), kafka-python's sender, one retry
thread (``bridge-retry:<site>``) and the command forwarder (``bridge-commands:<site>``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from kafka import KafkaConsumer
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from stream.kafka import deadletter_record, ensure_topics, reliable_producer
from stream.messages import Command, Envelope, Event, MessageError, parse_message
from stream.mqtt import MqttClient, MqttSettings
from stream.topics import KafkaTopics, command_topic, parse_topic, site_filter

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RETRY_MAX_S = 10.0
EDGE_KINDS = ("result", "anomaly", "heartbeat", "event", "status")
"""What edge agents publish, and so what the bridge carries into Kafka."""


@dataclass(frozen=True)
class _Record:
    """One MQTT message on its way to Kafka."""

    mid: int
    topic: str
    key: bytes
    value: bytes
    timestamp_ms: int | None
    received: float
    kind: str


class _InOrderAcks:
    """Sends MQTT acknowledgements in arrival order, whatever order Kafka confirms in."""

    def __init__(self, send_ack: Callable[[int], None]) -> None:
        self._send_ack = send_ack
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._lock = threading.Lock()

    def expect(self, mid: int) -> None:
        with self._lock:
            self._order.append(mid)

    def done(self, mid: int) -> None:
        with self._lock:
            self._done.add(mid)
            while self._order and self._order[0] in self._done:
                head = self._order.popleft()
                self._done.discard(head)
                self._send_ack(head)

    def pending(self) -> int:
        with self._lock:
            return len(self._order)


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter("edgeline_bridge_mqtt_received", "MQTT messages received", ["kind"],
                                registry=self.registry)
        self.produced = Counter("edgeline_bridge_kafka_produced", "Records Kafka acknowledged", ["topic"],
                                registry=self.registry)
        self.dead_lettered = Counter("edgeline_bridge_dead_lettered", "Messages sent to the dead-letter topic",
                                     registry=self.registry)
        self.produce_errors = Counter("edgeline_bridge_produce_errors", "Kafka sends that failed and were retried",
                                      registry=self.registry)
        self.commands = Counter("edgeline_bridge_commands_forwarded", "Commands published to the edge",
                                registry=self.registry)
        self.latency = Histogram("edgeline_bridge_latency_seconds", "MQTT receipt to Kafka acknowledgement",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.unacked = Gauge("edgeline_bridge_unacked_messages", "MQTT messages awaiting their Kafka ack",
                             registry=self.registry)


class MqttKafkaBridge:
    """One site's bridge; ``start()``/``stop()`` (ordered: MQTT intake first, then Kafka flush)."""

    def __init__(self, site: str, mqtt: MqttSettings, bootstrap: str, *, topics: KafkaTopics | None = None,
                 partitions: int = 4, replication: int = 1, forward_commands: bool = True) -> None:
        self.site = site
        self.topics = topics or KafkaTopics()
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.replication = replication
        self.forward_commands = forward_commands
        self.metrics = BridgeMetrics()
        self.mqtt = MqttClient(mqtt, client_id=f"edgeline-bridge-{site}", clean_session=False, manual_ack=True)
        self._acks = _InOrderAcks(self.mqtt.ack)
        self._retries: queue.Queue[_Record] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._producer = None
        self._metrics_server = None
        self.metrics_port: int | None = None

    def start(self, metrics_port: int | None = None, connect_timeout_s: float = 30.0) -> None:
        ensure_topics(self.bootstrap, self.topics, self.partitions, self.replication)
        self._producer = reliable_producer(self.bootstrap, f"edgeline-bridge-{self.site}")
        self._stop.clear()
        self._spawn(f"bridge-retry:{self.site}", self._retry_loop)
        if self.forward_commands:
            self._spawn(f"bridge-commands:{self.site}", self._command_loop)
        self.mqtt.subscribe(site_filter(self.site), self._on_message)
        self.mqtt.start()
        self.mqtt.wait_connected(connect_timeout_s)
        if metrics_port is not None:
            self._metrics_server, _ = start_http_server(metrics_port, registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        log.info("bridge:%s: MQTT %s:%d -> Kafka %s", self.site, self.mqtt.settings.host, self.mqtt.settings.port,
                 self.bootstrap)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop MQTT intake, let Kafka confirm what is in flight (and ack it), then close."""
        self.mqtt.stop()  # unacked messages stay with the broker for the next session
        if self._producer is not None:
            self._producer.flush(timeout=timeout_s)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
            self._producer = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        log.info("bridge:%s: stopped", self.site)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------ MQTT -> Kafka

    def _on_message(self, message: paho.MQTTMessage) -> None:
        received = time.monotonic()
        if not self._from_an_edge(message.topic):
            self._ack_now(message)  # commands we publish, decisions/alerts of an embedded runner, side topics
            return
        try:
            record = self._record_for(message, received)
        except MessageError as exc:
            self._dead_letter(message, exc.reason, received)
            return
        self.metrics.received.labels(record.kind).inc()
        self._send(record)

    @staticmethod
    def _from_an_edge(topic: str) -> bool:
        try:
            return parse_topic(topic).kind in EDGE_KINDS
        except ValueError:  # malformed: dead-lettered, unless a service's side topic (edgeline/v1/<site>/_...)
            levels = topic.split("/")
            return len(levels) < 4 or not levels[3].startswith("_")

    def _record_for(self, message: paho.MQTTMessage, received: float) -> _Record:
        try:
            parts = parse_topic(message.topic)
        except ValueError as exc:
            raise MessageError(str(exc)) from None
        if parts.kind == "status":
            envelope: Envelope = self._status_event(parts.machine, message.payload)
        else:
            envelope = parse_message(message.payload)
            if (parts.site, parts.machine, parts.kind) != (envelope.site, envelope.machine, envelope.KIND):
                raise MessageError(f"message for {envelope.site}/{envelope.machine}/{envelope.KIND} "
                                   f"on topic {message.topic}")
        value = envelope.to_json() if parts.kind == "status" else message.payload
        return _Record(message.mid, self.topics.for_message(envelope), envelope.machine.encode(), value,
                       int(envelope.ts * 1000), received, envelope.KIND)

    def _status_event(self, machine: str, payload: bytes) -> Event:
        state = payload.decode("utf-8", errors="replace").strip()
        if state not in ("online", "offline"):
            raise MessageError(f"status must be 'online' or 'offline', got {state[:40]!r}")
        return Event(site=self.site, machine=machine, ts=time.time(), name=f"machine_{state}",
                     level="warning" if state == "offline" else "info", text=f"{machine} is {state}")

    def _send(self, record: _Record) -> None:
        if record.mid:
            self._acks.expect(record.mid)
        self.metrics.unacked.set(self._acks.pending())
        self._produce(record)

    def _produce(self, record: _Record) -> None:
        try:
            future = self._producer.send(record.topic, key=record.key, value=record.value,  # type: ignore[union-attr]
                                         timestamp_ms=record.timestamp_ms)
        except KafkaError as exc:
            self._failed(record, exc)
            return
        future.add_callback(lambda _meta: self._confirmed(record))
        future.add_errback(lambda exc: self._failed(record, exc))

    def _confirmed(self, record: _Record) -> None:
        self.metrics.produced.labels(record.topic).inc()
        self.metrics.latency.observe(time.monotonic() - record.received)
        if record.mid:
            self._acks.done(record.mid)
        self.metrics.unacked.set(self._acks.pending())

    def _failed(self, record: _Record, exc: BaseException) -> None:
        self.metrics.produce_errors.inc()
        log.warning("bridge:%s: Kafka refused a %s record (%s); retrying", self.site, record.topic, exc)
        self._retries.put(record)

    def _retry_loop(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                record = self._retries.get(timeout=0.5)
            except queue.Empty:
                delay = 0.5
                continue
            self._stop.wait(delay)
            delay = min(RETRY_MAX_S, delay * 2)
            self._produce(record)

    def _dead_letter(self, message: paho.MQTTMessage, reason: str, received: float) -> None:
        self.metrics.dead_lettered.inc()
        log.warning("bridge:%s: dead-lettered a message on %s: %s", self.site, message.topic, reason)
        record = _Record(message.mid, self.topics.deadletter, self.site.encode(),
                         deadletter_record(message.topic, reason, message.payload), None, received, "deadletter")
        self._send(record)

    def _ack_now(self, message: paho.MQTTMessage) -> None:
        if message.mid:
            self._acks.expect(message.mid)
            self._acks.done(message.mid)

    # ------------------------------------------------------------ Kafka -> MQTT commands

    def _command_loop(self) -> None:
        consumer = KafkaConsumer(self.topics.for_kind("command"), bootstrap_servers=self.bootstrap,
                                 group_id=f"edgeline-bridge-{self.site}", client_id=f"edgeline-bridge-{self.site}-cmd",
                                 enable_auto_commit=False, auto_offset_reset="earliest")
        try:
            while not self._stop.is_set():
                batches = consumer.poll(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        self._forward_command(record.value)
                if batches:
                    consumer.commit()
        finally:
            consumer.close()

    def _forward_command(self, payload: bytes) -> None:
        try:
            command = parse_message(payload)
            if not isinstance(command, Command):
                raise MessageError(f"{command.KIND} on the commands topic")
        except MessageError as exc:
            self.metrics.dead_lettered.inc()
            self._producer.send(self.topics.deadletter, key=self.site.encode(),  # type: ignore[union-attr]
                                value=deadletter_record(self.topics.for_kind("command"), exc.reason, payload))
            return
        if command.site != self.site:
            return  # another site's bridge forwards it
        while not self._stop.is_set():
            info = self.mqtt.publish(command_topic(command.site, command.machine, command.name), payload, qos=1)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                info.wait_for_publish(10.0)
                if info.is_published():
                    self.metrics.commands.inc()
                    log.info("bridge:%s: command %s -> %s", self.site, command.name, command.machine)
                    return
            self._stop.wait(1.0)  # broker away: hold the offset and try again
