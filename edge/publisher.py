"""Where the edge pipelines hand their messages: a :class:`Publisher`.

:class:`OutboxPublisher` is the agent's: heartbeats go straight to MQTT (only the latest matters),
everything else into the store-and-forward outbox, ranked by :func:`priority_of`.
:class:`MemoryPublisher` keeps messages in a list, for tests and benches that need no broker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.outbox import Forwarder, Outbox, Priority
from stream.messages import Alert, Anomaly, Envelope, Heartbeat, Result
from stream.mqtt import MqttClient
from stream.topics import topic_for


class Publisher(Protocol):
    def publish(self, message: Envelope) -> bool:
        """Hand ``message`` on; False when it could not be stored or sent."""
        ...


class OutboxPublisher:
    """Heartbeats straight out over MQTT; everything else through the outbox and its forwarder."""

    def __init__(self, outbox: Outbox, forwarder: Forwarder, mqtt: MqttClient) -> None:
        self.outbox = outbox
        self.forwarder = forwarder
        self.mqtt = mqtt
        self.publish_failures = 0
        """Heartbeats the MQTT client refused."""

    def publish(self, message: Envelope) -> bool:
        if isinstance(message, Heartbeat):
            info = self.mqtt.publish(topic_for(message), message.to_json(), qos=1)
            if info.rc != 0:
                self.publish_failures += 1
            return info.rc == 0
        if self.outbox.put(topic_for(message), message.to_json(), priority_of(message)) is None:
            return False
        self.forwarder.notify()
        return True


class MemoryPublisher:
    """Keeps every message it is handed, in order (``accept=False``: refuses them all, as a full outbox would)."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.messages: list[Envelope] = []
        self._lock = threading.Lock()

    def publish(self, message: Envelope) -> bool:
        with self._lock:
            if self.accept:
                self.messages.append(message)
        return self.accept

    def of(self, kind: type[Envelope]) -> list:
        """The kept messages of one type."""
        with self._lock:
            return [m for m in self.messages if isinstance(m, kind)]


def priority_of(message: Envelope) -> Priority:
    """Outbox rank: sampled masks go first when full, then results; alerts and anomalies last."""
    if isinstance(message, Result):
        return Priority.MASK if any(o.mask for f in message.frames for o in f.outputs) else Priority.RESULT
    if isinstance(message, Anomaly):
        return Priority.ANOMALY
    if isinstance(message, Alert):
        return Priority.ALERT
    return Priority.EVENT


class TransportCollector(Collector):
    """The outbox and the MQTT link of one agent, read at scrape time."""

    def __init__(self, machine: str, publisher: OutboxPublisher) -> None:
        self.machine = machine
        self.publisher = publisher

    def collect(self) -> Iterator[Metric]:
        outbox = self.publisher.outbox
        yield self._gauge("edgeline_edge_outbox_messages", "Messages stored, waiting for their PUBACK", outbox.depth)
        yield self._gauge("edgeline_edge_outbox_oldest_age_seconds",
                          "Age of the oldest message waiting in the outbox (0 when empty)", outbox.oldest_age_s())
        dropped = CounterMetricFamily("edgeline_edge_outbox_dropped", "Messages the full outbox dropped",
                                      labels=["machine", "priority"])
        for priority in Priority:
            dropped.add_metric([self.machine, priority.name.lower()], outbox.dropped[priority])
        yield dropped
        failures = CounterMetricFamily("edgeline_edge_publish_failures", "Publishes the MQTT client refused",
                                       labels=["machine"])
        failures.add_metric([self.machine], self.publisher.publish_failures)
        yield failures
        yield self._gauge("edgeline_edge_mqtt_connected", "1 while connected to the broker",
                          1.0 if self.publisher.mqtt.connected.is_set() else 0.0)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["machine"])
        family.add_metric([self.machine], value)
        return family
