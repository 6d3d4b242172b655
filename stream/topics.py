"""Topic names, MQTT and Kafka, in one place (DESIGN.md "Messages")."""

from __future__ import annotations

from dataclasses import dataclass

from stream.messages import Envelope

MQTT_ROOT = "edgeline/v1"
MQTT_KINDS = ("result", "anomaly", "heartbeat", "event", "alert", "decision", "status")
CAMERA_KINDS = ("result",)

KAFKA_RESULTS = "edgeline.results"
KAFKA_ANOMALIES = "edgeline.anomalies"
KAFKA_HEARTBEATS = "edgeline.heartbeats"
KAFKA_EVENTS = "edgeline.events"
KAFKA_DECISIONS = "edgeline.decisions"
KAFKA_ALERTS = "edgeline.alerts"
KAFKA_COMMANDS = "edgeline.commands"
KAFKA_DEADLETTER = "edgeline.deadletter"
KAFKA_TOPIC_BY_KIND = {
    "result": KAFKA_RESULTS,
    "anomaly": KAFKA_ANOMALIES,
    "heartbeat": KAFKA_HEARTBEATS,
    "event": KAFKA_EVENTS,
    "decision": KAFKA_DECISIONS,
    "alert": KAFKA_ALERTS,
    "command": KAFKA_COMMANDS,
}


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


def kafka_topic_for(message: Envelope) -> str:
    return KAFKA_TOPIC_BY_KIND[message.KIND]
