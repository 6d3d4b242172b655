"""Topic names, MQTT and Kafka, in one place (DESIGN.md "Messages")."""

from __future__ import annotations

from dataclasses import dataclass

from stream.messages import Envelope

MQTT_ROOT = "edgeline/v1"
MQTT_KINDS = ("result", "anomaly", "heartbeat", "event", "alert", "decision", "status")
CAMERA_KINDS = ("result",)

KAFKA_PREFIX = "edgeline"
KAFKA_KIND_TOPICS = {"result": "results", "anomaly": "anomalies", "heartbeat": "heartbeats", "event": "events",
                     "decision": "decisions", "alert": "alerts", "command": "commands"}


@dataclass(frozen=True)
class KafkaTopics:
    """Kafka topic names: ``<prefix>.results`` and so on (DESIGN.md "Messages"). The prefix
    (``stream.topic_prefix``, default ``edgeline``) lets sites or test runs share one cluster."""

    prefix: str = KAFKA_PREFIX

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def for_kind(self, kind: str) -> str:
        """The topic of a message kind (result, anomaly, heartbeat, event, decision, alert, command)."""
        return self.name(KAFKA_KIND_TOPICS[kind])

    def for_message(self, message: Envelope) -> str:
        return self.for_kind(message.KIND)

    @property
    def deadletter(self) -> str:
        return self.name("deadletter")

    @property
    def line_observations(self) -> str:
        """Observations for line-scoped rules, keyed by line (the worker's repartition step)."""
        return self.name("line-observations")

    @property
    def liveness_checks(self) -> str:
        """The worker's timer asks here, per silent machine, for an offline check (keyed by machine)."""
        return self.name("liveness-checks")

    def all(self) -> list[str]:
        """Every topic the pipeline reads or writes."""
        return [self.for_kind(kind) for kind in KAFKA_KIND_TOPICS] + [
            self.deadletter, self.line_observations, self.liveness_checks]


@dataclass(frozen=True)
class TopicParts:
    site: str
    machine: str
    kind: str
    name: str | None = None
    """The camera for results, the command name for ``cmd`` topics."""


def mqtt_topic(site: str, machine: str, kind: str, camera: str | None = None) -> str:
    if kind not in MQTT_KINDS:
        raise ValueError(f"unknown MQTT message kind {kind!r}; expected one of {', '.join(MQTT_KINDS)}")
    base = f"{MQTT_ROOT}/{site}/{machine}/{kind}"
    return f"{base}/{camera}" if camera else base


def topic_for(message: Envelope) -> str:
    """The MQTT topic a message is published on."""
    if message.KIND == "command":
        return command_topic(message.site, message.machine, message.name)  # type: ignore[attr-defined]
    return mqtt_topic(message.site, message.machine, message.KIND, getattr(message, "camera", None)
                      if message.KIND in CAMERA_KINDS else None)


def command_topic(site: str, machine: str, name: str) -> str:
    return f"{MQTT_ROOT}/{site}/{machine}/cmd/{name}"


def status_topic(site: str, machine: str) -> str:
    """Retained ``online``/``offline``; the last-will sets ``offline`` when a machine dies."""
    return mqtt_topic(site, machine, "status")


def site_filter(site: str = "+") -> str:
    """Subscription filter for everything machines of a site publish (commands excluded by kind)."""
    return f"{MQTT_ROOT}/{site}/#"


def machine_commands_filter(site: str, machine: str) -> str:
    return f"{MQTT_ROOT}/{site}/{machine}/cmd/+"


def deadletter_topic(site: str) -> str:
    """Where the embedded runner puts what it refuses (:func:`stream.deadletter.deadletter_record`);
    a service's side topic (``_`` level), which the bridge does not carry into Kafka."""
    return f"{MQTT_ROOT}/{site}/_deadletter"


def parse_topic(topic: str) -> TopicParts:
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != MQTT_ROOT:
        raise ValueError(f"not an Edgeline topic: {topic!r}")
    site, machine, kind, *rest = parts[2:]
    if kind == "cmd":
        if len(rest) != 1:
            raise ValueError(f"command topic needs exactly one name: {topic!r}")
        return TopicParts(site, machine, "command", rest[0])
    if kind not in MQTT_KINDS or len(rest) > 1:
        raise ValueError(f"unknown Edgeline topic kind in {topic!r}")
    return TopicParts(site, machine, kind, rest[0] if rest else None)
