"""The rules engine driven straight from MQTT, for one-box installs (no Kafka).

Subscribes to everything machines of a site publish, feeds results and anomalies to
:class:`stream.rules.RulesEngine`, and publishes the decisions, alerts and commands it makes.
A message that does not parse or fails a check of :func:`stream.messages.parse_message` (a
timestamp beyond the clock skew, a size over the limit, a non-finite number) goes to the
dead-letter topic with the reason, and is counted by check. Memory is bounded: at most
``dedupe_max_entries`` msg_ids (dedupe clocks per machine) and ``max_states`` rule states, both
shown in ``edgeline_rules_state_entries`` beside their bound.
Every alert (firing or resolved) and command is logged at INFO; :meth:`EmbeddedRulesRunner.summary`
is the one line ``edgeline stream embedded`` prints at shutdown. ``--metrics-port`` serves
:class:`RulesMetrics` to Prometheus. The runner is a :class:`stream.service.Service` (``rules:<site>``)
with no loops of its own: paho's network thread delivers the messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import paho.mqtt.client as paho
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stream.deadletter import deadletter_record
from stream.dedupe import Deduper
from stream.messages import DEFAULT_LIMITS, Alert, Command, Envelope, MessageError, MessageLimits, parse_message
from stream.mqtt import MqttClient
from stream.rule_config import RuleConfig
from stream.rules import DEFAULT_MAX_STATES, BoundedStates, RulesEngine
from stream.rules_metrics import EngineStatsCollector
from stream.service import Service
from stream.topics import deadletter_topic, mqtt_topic, parse_topic, topic_for

log = logging.getLogger(__name__)

INPUT_KINDS = ("result", "anomaly")


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MemoryCollector(Collector):
    """What the embedded engine holds in memory, its bound, and what the bound made it forget."""

    def __init__(self, engine: RulesEngine, states: BoundedStates) -> None:
        self.engine = engine
        self.states = states

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily("edgeline_rules_state_entries", "Entries held: msg_ids (dedupe) or rule states "
                                 "(rules)", labels=["store"])
        bound = GaugeMetricFamily("edgeline_rules_state_max_entries", "The configured bound of each store",
                                  labels=["store"])
        evicted = CounterMetricFamily("edgeline_rules_state_evicted", "Entries forgotten early because the store "
                                      "was at its bound", labels=["store"])
        stores: dict[str, Deduper | BoundedStates] = {"rules": self.states}
        if self.engine.deduper is not None:
            stores["dedupe"] = self.engine.deduper
        for name, store in stores.items():
            held.add_metric([name], len(store))
            bound.add_metric([name], store.max_entries)
            evicted.add_metric([name], store.evicted)
        yield from (held, bound, evicted)
        yield CounterMetricFamily("edgeline_rules_duplicates", "Messages dropped as repeats of a msg_id",
                                  value=self.engine.stats.duplicates)


class RulesMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.consumed = Counter("edgeline_rules_messages", "Results and anomaly scores evaluated", ["kind"],
                                registry=self.registry)
        self.dead_lettered = Counter("edgeline_rules_dead_lettered", "Messages sent to the dead-letter topic",
                                     registry=self.registry)
        self.invalid = Counter("edgeline_rules_invalid_messages", "Messages dead-lettered, by the check they failed "
                               "(json, schema, size, clock, topic)", ["check"], registry=self.registry)
        self.emitted = Counter("edgeline_rules_emitted", "Decisions, alerts and commands published", ["kind"],
                               registry=self.registry)
        self.latency = Histogram("edgeline_rules_latency_seconds", "A message's timestamp (its newest frame or "
                                 "sample) to its rule evaluation", ["kind"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)

    def count(self, name: str, **labels: str) -> int:
        """A counter's value now, e.g. ``count("dead_lettered")`` or ``count("emitted", kind="alert")``."""
        return int(self.registry.get_sample_value(f"edgeline_rules_{name}_total", labels) or 0)


class EmbeddedRulesRunner(Service):
    """One rules engine, fed by MQTT on ``edgeline/v1/<site>/+/result/+`` and ``.../anomaly``."""

    def __init__(self, site: str, rules: list[RuleConfig], client: MqttClient, *,
                 lines: dict[str, str] | None = None, allowed_lateness_s: float = 2.0,
                 dedupe_ttl_s: float = 60.0, dedupe_max_entries: int = 100_000,
                 max_states: int = DEFAULT_MAX_STATES, limits: MessageLimits = DEFAULT_LIMITS) -> None:
        super().__init__(f"rules:{site}")
        self.site = site
        self.limits = limits
        states = BoundedStates(max_states)
        self.engine = RulesEngine(rules, lines=lines, allowed_lateness_s=allowed_lateness_s,
                                  dedupe_ttl_s=dedupe_ttl_s, dedupe_max_entries=dedupe_max_entries,
                                  states=states, max_ahead_s=limits.max_ahead_s)
        self.mqtt = client
        self.metrics = RulesMetrics()
        self.metrics.registry.register(EngineStatsCollector("edgeline_rules", lambda: [self.engine.stats]))
        self.metrics.registry.register(MemoryCollector(self.engine, states))
        self.metrics_port: int | None = None
        self.listeners: list[Callable[[Envelope], None]] = []
        self._lock = threading.Lock()
        self._metrics_server: WSGIServer | None = None
        self._metrics_address: tuple[int | None, str] = (None, "127.0.0.1")

    def start(self, metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
        """Serve metrics on ``metrics_host:metrics_port`` if a port is given (0: a free one), then
        connect; OSError when the port cannot be bound, ConnectionError when the broker is not up."""
        self._metrics_address = (metrics_port, metrics_host)
        super().start()

    def on_start(self) -> None:
        """Subscribe, then serve metrics: once the metrics port answers, the runner hears every message."""
        try:
            self.mqtt.subscribe(mqtt_topic(self.site, "+", "result", "+"), self._on_message)
            self.mqtt.subscribe(mqtt_topic(self.site, "+", "anomaly"), self._on_message)
            self.mqtt.start()
            self.mqtt.wait_connected()
            port, host = self._metrics_address
            if port is not None:
                self._metrics_server, _ = start_http_server(port, host, registry=self.metrics.registry)
                self.metrics_port = self._metrics_server.server_port
        except BaseException:
            self.on_stop()
            raise

    def on_stop(self) -> None:
        self.mqtt.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def summary(self) -> str:
        """One line of counts, e.g. for the console at shutdown."""
        count = self.metrics.count
        stats = self.engine.stats
        messages = sum(count("messages", kind=kind) for kind in INPUT_KINDS)
        return (f"rules {self.site}: {messages} messages, {count('emitted', kind='decision')} decisions, "
                f"{count('emitted', kind='alert')} alerts, {count('emitted', kind='command')} commands, "
                f"{count('dead_lettered')} dead-lettered, {stats.late} late, {stats.duplicates} duplicates")

    def _on_message(self, message: paho.MQTTMessage) -> None:
        try:
            envelope = parse_message(message.payload, self.limits)
            self._check_topic(message.topic, envelope)
        except MessageError as exc:
            self._dead_letter(message, exc)
            return
        with self._lock:
            outputs = self.engine.process(envelope, now=time.time())
        self.metrics.consumed.labels(envelope.KIND).inc()
        self.metrics.latency.labels(envelope.KIND).observe(max(0.0, time.time() - envelope.ts))
        for output in outputs:
            self._emit(output)

    @staticmethod
    def _check_topic(topic: str, envelope: Envelope) -> None:
        parts = parse_topic(topic)
        if (parts.site, parts.machine, parts.kind) != (envelope.site, envelope.machine, envelope.KIND):
            raise MessageError(f"message for {envelope.site}/{envelope.machine}/{envelope.KIND} on topic {topic}",
                               "topic")

    def _emit(self, output: Envelope) -> None:
        self.mqtt.publish(topic_for(output), output.to_json(), qos=1)
        self.metrics.emitted.labels(output.KIND).inc()
        if isinstance(output, Alert):
            log.info("rules: alert %s: %s on %s %s, severity %s, value %g", output.state, output.rule, output.scope,
                     output.key, output.severity, output.value)
        elif isinstance(output, Command):
            log.info("rules: command %s -> %s/%s", output.name, output.machine, output.camera or "*")
        for listener in self.listeners:
            listener(output)

    def _dead_letter(self, message: paho.MQTTMessage, error: MessageError) -> None:
        self.metrics.dead_lettered.inc()
        self.metrics.invalid.labels(error.check).inc()
        log.warning("rules: dead-lettered a message on %s: %s", message.topic, error.reason)
        self.mqtt.publish(deadletter_topic(self.site),
                          deadletter_record(message.topic, error.reason, message.payload, error.check), qos=1)
