"""The MQTT -> Kafka bridge, and Kafka commands back to the edge.

Inbound: one persistent MQTT session (clean_session=False, QoS 1, manual acks) subscribed to
everything a site's machines publish. Each message is validated and produced to the Kafka topic of
its kind, keyed by machine (so one machine's messages stay ordered on one partition), with the
capture time as the record timestamp. The MQTT message is acknowledged only after Kafka has
acknowledged the record (idempotent producer, acks=all), and acknowledgements go out in the order
the messages came in. If the bridge dies in between, the broker redelivers to the same session;
consumers dedupe on ``msg_id``.

A record Kafka fails for a transient reason (broker away, leader moving, delivery timeout) is
retried on its own backoff (``retry_first_s`` doubling to ``retry_max_s``), never dropped; the first
record Kafka confirms after failures brings every waiting retry forward, so a queue of retries
drains as soon as Kafka is back. A record Kafka refuses for what it is (too large, a timestamp it
cannot encode, an invalid record) goes to the dead-letter topic with the reason and is acked, so
one record never holds up the ones behind it.

Messages that fail validation (bad JSON, schema, topic/body mismatch) go to
``<prefix>.deadletter`` with the reason, are counted, and are acknowledged. A machine's retained
``status`` (``online``/``offline``, the last-will) becomes an :class:`Event`
(``machine_online``/``machine_offline``) on ``<prefix>.events`` for fleet liveness.

Outbound: ``<prefix>.commands`` (consumer group ``edgeline-bridge-<site>``) is published to each
machine's MQTT command topic at QoS 1; a record's offset is committed only after the broker's
PUBACK.

The bridge is a :class:`stream.service.Service` (``bridge:<site>``) whose loops are supervised
(``edgeline_bridge_restarts_total`` on its metrics endpoint). ``stop()`` is ordered: stop taking
MQTT messages, give Kafka ``shutdown_timeout_s`` to confirm the records in flight (the retry loop
still runs; their MQTT acks go out as Kafka confirms), stop the loops, close the producer (a last
flush, whose acks go out too), and only then disconnect from MQTT; whatever is left unacked stays
with the broker.

Threads: paho's network loop (``mqtt:edgeline-bridge-<site>``), kafka-python's sender, the retry
loop (``bridge:<site>/retry``) and the command forwarder (``bridge:<site>/commands``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import paho.mqtt.client as paho
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import (CorruptRecordError, InvalidRecordError, InvalidTimestampError, KafkaError,
                          KafkaTimeoutError, MessageSizeTooLargeError, RecordListTooLargeError, UnsupportedForMessageFormatError)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from stream.deadletter import deadletter_record
from stream.kafka import close_producer, ensure_topics, reliable_producer
from stream.messages import DEFAULT_LIMITS, Command, Envelope, Event, MessageError, MessageLimits, parse_message
from stream.mqtt import MqttClient, MqttSettings
from stream.service import Service, Supervisor
from stream.settings import BridgeSettings
from stream.topics import KafkaTopics, command_topic, parse_topic, site_filter

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
KAFKA_TS_MAX_S = 253402300799.0
"""The last second of year 9999: later timestamps cannot be encoded in a record batch beside others."""
SEND_BLOCK_MS = 1000
"""Longest a send may block paho's network thread (metadata unknown while Kafka is away, buffer full)."""
STUCK_GRACE_S = 5.0
"""A record still in the producer this long after its delivery timeout is taken back and retried."""
PERMANENT_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError,
                    InvalidTimestampError, UnsupportedForMessageFormatError, struct.error, OverflowError, TypeError,
                    ValueError)
"""What Kafka (or the client, encoding it) says about one record that no retry changes."""
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
    attempts: int = 0


def is_permanent(exc: BaseException) -> bool:
    """True when a failure is about the record itself (size, encoding): retrying cannot help."""
    return isinstance(exc, PERMANENT_ERRORS)


class InProducer:
    """The records handed to the Kafka producer and not yet confirmed or failed, with when they
    were handed over. Each send has its own token, and only the first outcome of a token counts,
    so a record given up on (and retried) is never acknowledged twice."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[float, _Record]] = {}  # in send order
        self._tokens = itertools.count()
        self._lock = threading.Lock()

    def add(self, record: _Record, now: float) -> int:
        with self._lock:
            token = next(self._tokens)
            self._sent[token] = (now, record)
            return token

    def pop(self, token: int) -> _Record | None:
        with self._lock:
            entry = self._sent.pop(token, None)
        return None if entry is None else entry[1]

    def oldest_age(self, now: float) -> float:
        with self._lock:
            return now - next(iter(self._sent.values()))[0] if self._sent else 0.0

    def take_all(self) -> list[_Record]:
        with self._lock:
            records = [record for _, record in self._sent.values()]
            self._sent.clear()
        return records


class RetrySchedule:
    """Records waiting to be sent again, each on its own backoff: ``first_s`` after its first
    failure, doubling per attempt up to ``max_s``. Thread-safe; pure (no I/O), tested alone."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._heap: list[tuple[float, int, _Record]] = []
        self._arrival = itertools.count()
        self._ready = threading.Condition()

    def __len__(self) -> int:
        with self._ready:
            return len(self._heap)

    def add(self, record: _Record, now: float) -> float:
        """Schedule ``record`` (whose ``attempts`` failed so far); returns when it is due."""
        due = now + min(self.max_s, self.first_s * 2 ** max(0, record.attempts - 1))
        with self._ready:
            heapq.heappush(self._heap, (due, next(self._arrival), record))
            self._ready.notify()
        return due

    def hasten(self, now: float) -> None:
        """Kafka is confirming again: every record waits ``first_s`` at most."""
        latest = now + self.first_s
        with self._ready:
            self._heap = [(min(due, latest), order, record) for due, order, record in self._heap]
            heapq.heapify(self._heap)
            self._ready.notify()

    def take_due(self, timeout_s: float, now: Callable[[], float] = time.monotonic) -> list[_Record]:
        """The records due by now, in the order they were first scheduled; waits up to ``timeout_s``
        for the first one to fall due (``[]`` if none does)."""
        deadline = now() + timeout_s
        with self._ready:
            while not self._heap or self._heap[0][0] > (current := now()):
                wait = min(deadline, self._heap[0][0] if self._heap else deadline) - now()
                if wait <= 0:
                    return []
                self._ready.wait(wait)
            due = []
            while self._heap and self._heap[0][0] <= current:
                due.append(heapq.heappop(self._heap))
        return [record for _, _, record in sorted(due, key=lambda entry: entry[1])]

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()


class _InOrderAcks:
    """Sends MQTT acknowledgements in arrival order, whatever order Kafka confirms in."""

    def __init__(self, send_ack: Callable[[int], None]) -> None:
        self._send_ack = send_ack
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._lock = threading.Condition()

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
            if not self._order:
                self._lock.notify_all()

    def pending(self) -> int:
        with self._lock:
            return len(self._order)

    def wait_all_acked(self, timeout_s: float) -> bool:
        """Until every expected message is acked (True) or ``timeout_s`` passed (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._order, timeout_s)


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
        self.refused = Counter("edgeline_bridge_kafka_refused", "Records Kafka refused for good (too large, "
                               "unencodable), dead-lettered", registry=self.registry)
        self.retrying = Gauge("edgeline_bridge_retry_records", "Records waiting for their next try",
                              registry=self.registry)
        self.commands = Counter("edgeline_bridge_commands_forwarded", "Commands published to the edge",
                                registry=self.registry)
        self.latency = Histogram("edgeline_bridge_latency_seconds", "MQTT receipt to Kafka acknowledgement",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.unacked = Gauge("edgeline_bridge_unacked_messages", "MQTT messages awaiting their Kafka ack",
                             registry=self.registry)


class MqttKafkaBridge(Service):
    """One site's bridge; ``start()``/``stop()`` (ordered: MQTT intake, Kafka flush and the acks it
    brings, then MQTT disconnect). ``supervisor``: by default ``Supervisor("bridge")`` counting in
    :attr:`metrics`' registry."""

    def __init__(self, site: str, mqtt: MqttSettings, bootstrap: str, *, topics: KafkaTopics | None = None,
                 partitions: int = 4, replication: int = 1, forward_commands: bool = True,
                 settings: BridgeSettings | None = None, limits: MessageLimits = DEFAULT_LIMITS,
                 supervisor: Supervisor | None = None) -> None:
        self.metrics = BridgeMetrics()
        super().__init__(f"bridge:{site}", supervisor=supervisor or Supervisor("bridge",
                                                                               registry=self.metrics.registry))
        self.site = site
        self.topics = topics or KafkaTopics()
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.replication = replication
        self.forward_commands = forward_commands
        self.settings = settings or BridgeSettings()
        self.limits = limits
        self.mqtt = MqttClient(mqtt, client_id=f"edgeline-bridge-{site}", clean_session=False, manual_ack=True)
        self._acks = _InOrderAcks(self.mqtt.ack)
        self._retries = RetrySchedule(self.settings.retry_first_s, self.settings.retry_max_s)
        self._in_producer = InProducer()
        self._kafka_failing = False
        self._taking = False
        self._intake = threading.Lock()
        """Held from the check of ``_taking`` to the expectation of an ack, so that none comes after stop()."""
        self._all_acked = True
        self._producer: KafkaProducer | None = None
        self._last_refusal: BaseException | None = None
        self._renew_producer = False
        self._metrics_server = None
        self._metrics_port_wanted: int | None = None
        self._connect_timeout_s = 30.0
        self.metrics_port: int | None = None
        self.add_loop("retry", self._retry_loop)
        if forward_commands:
            self.add_loop("commands", self._command_loop)

    def start(self, metrics_port: int | None = None, connect_timeout_s: float = 30.0) -> None:
        """Connect to Kafka (creating the topics) and MQTT, then the loops; serve metrics on
        ``metrics_port`` if given (0: a free one)."""
        self._metrics_port_wanted, self._connect_timeout_s = metrics_port, connect_timeout_s
        super().start()

    def on_start(self) -> None:
        ensure_topics(self.bootstrap, self.topics, self.partitions, self.replication)
        self._producer = self._new_producer()
        self._all_acked = True
        self._taking = True
        try:
            self.mqtt.subscribe(site_filter(self.site), self._on_message)
            self.mqtt.start()
            self.mqtt.wait_connected(self._connect_timeout_s)
            if self._metrics_port_wanted is not None:
                self._metrics_server, _ = start_http_server(self._metrics_port_wanted, registry=self.metrics.registry)
                self.metrics_port = self._metrics_server.server_port
        except BaseException:
            self._taking = False
            self.on_stop()
            raise
        log.info("bridge:%s: MQTT %s:%d -> Kafka %s", self.site, self.mqtt.settings.host, self.mqtt.settings.port,
                 self.bootstrap)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking MQTT messages, give Kafka ``shutdown_timeout_s`` to confirm the records in
        flight (their MQTT acks go out as it does), stop the loops, close the producer, and then
        disconnect from MQTT. What is left unacked stays with the broker, which redelivers it to
        the next session."""
        with self._intake:
            taking, self._taking = self._taking, False
        if taking:
            self._all_acked = self._acks.wait_all_acked(self.settings.shutdown_timeout_s)
            self.stopping.set()
            self._retries.wake()
        super().stop(max(timeout_s, self.settings.shutdown_timeout_s + 5.0))

    def on_stop(self) -> None:
        if self._producer is not None:  # confirmations of this last flush are acked: MQTT is still up
            close_producer(self._producer, self.settings.shutdown_timeout_s if self._all_acked else 0.0)
            self._producer = None
        self.mqtt.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        log.info("bridge:%s: stopped; %d messages left unacked for the broker to redeliver", self.site,
                 self._acks.pending())

    @property
    def _stuck_after_s(self) -> float:
        return self.settings.delivery_timeout_s + STUCK_GRACE_S

    def _new_producer(self) -> KafkaProducer:
        """A producer; a replacement reuses the broker version the first one found, so that it is
        made at once even while Kafka is away (probing blocks until Kafka answers)."""
        delivery_ms = int(self.settings.delivery_timeout_s * 1000)
        known = {"api_version": self._producer.config["api_version"]} if self._producer is not None else {}
        return reliable_producer(self.bootstrap, f"edgeline-bridge-{self.site}", delivery_timeout_ms=delivery_ms,
                                 linger_ms=self.settings.linger_ms,
                                 request_timeout_ms=min(30_000, delivery_ms // 2), max_block_ms=SEND_BLOCK_MS,
                                 **known)

    # ------------------------------------------------------------ MQTT -> Kafka

    def _on_message(self, message: paho.MQTTMessage) -> None:
        with self._intake:
            if not self._taking:
                return  # stopping: left unacked, the broker redelivers it to the next session
            received = time.monotonic()
            if not self._from_an_edge(message.topic):
                self._ack_now(message)  # commands we publish, decisions/alerts of an embedded runner, side topics
                return
            try:
                record = self._record_for(message, received)
            except MessageError as exc:
                self._dead_letter(message, exc, received)
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
            raise MessageError(str(exc), "topic") from None
        if parts.kind == "status":
            envelope: Envelope = self._status_event(parts.machine, message.payload)
        else:
            envelope = parse_message(message.payload, self.limits)
            if (parts.site, parts.machine, parts.kind) != (envelope.site, envelope.machine, envelope.KIND):
                raise MessageError(f"message for {envelope.site}/{envelope.machine}/{envelope.KIND} "
                                   f"on topic {message.topic}", "topic")
        if not 0 <= envelope.ts <= KAFKA_TS_MAX_S:
            raise MessageError(f"ts {envelope.ts:.6g} is outside the timestamps a Kafka record can carry", "clock")
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

    def _produce(self, record: _Record) -> bool:
        """Hand ``record`` to the producer; False when ``send()`` itself failed."""
        token = self._in_producer.add(record, time.monotonic())
        try:
            future = self._producer.send(record.topic, key=record.key, value=record.value,  # type: ignore[union-attr]
                                         timestamp_ms=record.timestamp_ms)
        except (KafkaError, *PERMANENT_ERRORS) as exc:
            self._in_producer.pop(token)
            self._failed(record, exc, sent=False)
            return False
        future.add_callback(lambda _meta: self._outcome(token, None))
        future.add_errback(lambda exc: self._outcome(token, exc))
        return True

    def _outcome(self, token: int, exc: BaseException | None) -> None:
        record = self._in_producer.pop(token)
        if record is None:
            return  # given up on when its producer was replaced, and retried
        if exc is None:
            self._confirmed(record)
        else:
            self._failed(record, exc, sent=True)

    def _confirmed(self, record: _Record) -> None:
        self.metrics.produced.labels(record.topic).inc()
        self.metrics.latency.observe(time.monotonic() - record.received)
        if self._kafka_failing:
            self._kafka_failing = False
            self._retries.hasten(time.monotonic())
        self._finished(record)

    def _finished(self, record: _Record) -> None:
        if record.mid:
            self._acks.done(record.mid)
        self.metrics.unacked.set(self._acks.pending())

    def _failed(self, record: _Record, exc: BaseException, *, sent: bool) -> None:
        """``sent``: the failure came back from the producer (else ``send()`` raised it)."""
        if self.stopping.is_set():
            return  # abandoned at shutdown: its MQTT message is redelivered to the next bridge
        if is_permanent(exc) and exc is not self._last_refusal:
            self._refused(record, exc, sent)
            return
        self._kafka_failing = True
        if sent and isinstance(exc, KafkaTimeoutError):
            self._renew_producer = True  # kafka-python may hold the rest of an expired partition forever
        self._retry_later(record, exc)

    def _retry_later(self, record: _Record, exc: BaseException) -> None:
        self.metrics.produce_errors.inc()
        retry = replace(record, attempts=record.attempts + 1)
        wait_s = self._retries.add(retry, time.monotonic()) - time.monotonic()
        self.metrics.retrying.set(len(self._retries))
        log.warning("bridge:%s: Kafka failed a %s record (attempt %d: %s); retrying in %.1f s", self.site,
                    record.topic, retry.attempts, exc, wait_s)

    def _refused(self, record: _Record, exc: BaseException, sent: bool) -> None:
        """Kafka will never take this record: dead-letter it with the reason, so that its MQTT
        message is acked and the ones behind it are not held up.

        After the broker refuses one record, kafka-python's idempotent producer fails every other
        record in flight with the same exception and takes no more: those are retried (on a new
        producer, which the retry thread makes), only the first one is dead-lettered."""
        self.metrics.refused.inc()
        if sent:
            self._last_refusal = exc
            self._renew_producer = True
        reason = f"Kafka refused the record: {type(exc).__name__}: {exc}"
        if record.kind == "deadletter":
            log.error("bridge:%s: %s, even as a dead letter; acked and dropped", self.site, reason)
            self._finished(record)
            return
        log.warning("bridge:%s: dead-lettered a %s record of %s: %s", self.site, record.kind, record.key.decode(),
                    reason)
        self.metrics.dead_lettered.inc()
        self._produce(_Record(record.mid, self.topics.deadletter, record.key,
                              deadletter_record(record.topic, reason, record.value, "kafka"), None, record.received,
                              "deadletter"))

    def _retry_loop(self) -> None:
        while not self.stopping.is_set():
            if self._renew_producer or self._in_producer.oldest_age(time.monotonic()) > self._stuck_after_s:
                self._renew_producer = True
                self._replace_producer()
            due = self._retries.take_due(timeout_s=0.5)
            for index, record in enumerate(due):
                if not self._produce(record):  # each send would block SEND_BLOCK_MS: the rest wait their turn
                    for later in due[index + 1:]:
                        self._retries.add(later, time.monotonic())
                    break
            self.metrics.retrying.set(len(self._retries))

    def _replace_producer(self) -> None:
        """A new producer; the records the old one held are retried. Done after a refusal, an
        expiry, or a record held past its delivery timeout (kafka-python does not always expire
        records while the broker is away, and would hold them, and the acks behind them, forever)."""
        try:
            new = self._new_producer()
        except KafkaError as exc:  # Kafka still away: the next turn of the retry loop tries again
            log.debug("bridge:%s: no new Kafka producer yet: %s", self.site, exc)
            return
        self._renew_producer = False
        held = self._in_producer.take_all()
        old, self._producer = self._producer, new
        if old is not None:
            close_producer(old, 0.0)
        for record in held:
            self._retry_later(record, KafkaTimeoutError("held by a replaced producer"))
        log.info("bridge:%s: new Kafka producer (the last one refused a record, or let %d expire or hold them)",
                 self.site, len(held))

    def _dead_letter(self, message: paho.MQTTMessage, error: MessageError, received: float) -> None:
        self.metrics.dead_lettered.inc()
        log.warning("bridge:%s: dead-lettered a message on %s: %s", self.site, message.topic, error.reason)
        record = _Record(message.mid, self.topics.deadletter, self.site.encode(),
                         deadletter_record(message.topic, error.reason, message.payload, error.check), None, received,
                         "deadletter")
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
        failing = False
        try:
            while not self.stopping.is_set():
                try:
                    self._forward_commands_once(consumer)
                    failing = False
                except KafkaError as exc:  # Kafka away: the commands wait in their topic
                    if not failing:
                        log.warning("bridge:%s: reading commands failed (%s); retrying", self.site, exc)
                    failing = True
                    self.stopping.wait(1.0)
        finally:
            consumer.close()

    def _forward_commands_once(self, consumer: KafkaConsumer) -> None:
        batches = consumer.poll(timeout_ms=500)
        for records in batches.values():
            for record in records:
                self._forward_command(record.value)
        if batches:
            consumer.commit()

    def _forward_command(self, payload: bytes) -> None:
        try:
            command = parse_message(payload)
            if not isinstance(command, Command):
                raise MessageError(f"{command.KIND} on the commands topic", "topic")
        except MessageError as exc:
            self.metrics.dead_lettered.inc()
            self._producer.send(self.topics.deadletter, key=self.site.encode(),  # type: ignore[union-attr]
                                value=deadletter_record(self.topics.for_kind("command"), exc.reason, payload,
                                                        exc.check))
            return
        if command.site != self.site:
            return  # another site's bridge forwards it
        while not self.stopping.is_set():
            info = self.mqtt.publish(command_topic(command.site, command.machine, command.name), payload, qos=1)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                info.wait_for_publish(10.0)
                if info.is_published():
                    self.metrics.commands.inc()
                    log.info("bridge:%s: command %s -> %s", self.site, command.name, command.machine)
                    return
            self.stopping.wait(1.0)  # broker away: hold the offset and try again
