from __future__ import annotations

import pytest

from stream.messages import Alert, Command, Heartbeat
from stream.topics import KafkaTopics, command_topic, mqtt_topic, parse_topic, status_topic, topic_for
from tests.unit.stream.test_messages import BASE, result


def test_topic_names_follow_the_design() -> None:
    assert mqtt_topic("plant-a", "m01", "result", "cam2") == "edgeline/v1/plant-a/m01/result/cam2"
    assert mqtt_topic("plant-a", "m01", "heartbeat") == "edgeline/v1/plant-a/m01/heartbeat"
    assert command_topic("plant-a", "m01", "set_fps") == "edgeline/v1/plant-a/m01/cmd/set_fps"
    assert status_topic("plant-a", "m01") == "edgeline/v1/plant-a/m01/status"
    with pytest.raises(ValueError, match="unknown MQTT message kind"):
        mqtt_topic("plant-a", "m01", "bogus")


def test_each_message_knows_its_topics() -> None:
    assert topic_for(result()) == "edgeline/v1/plant-a/m01/result/cam1"
    assert topic_for(Heartbeat(**BASE, uptime_s=1)) == "edgeline/v1/plant-a/m01/heartbeat"
    assert topic_for(Command(**BASE, name="snapshot", camera="cam1")) == "edgeline/v1/plant-a/m01/cmd/snapshot"
    alert = Alert(**BASE, rule="r", state="firing", severity="info", scope="camera", key="m01/cam1", value=1,
                  camera="cam1")
    assert topic_for(alert) == "edgeline/v1/plant-a/m01/alert"
    assert KafkaTopics().for_message(result()) == "edgeline.results"
    assert KafkaTopics("plant7").for_kind("command") == "plant7.commands"
    assert len(set(KafkaTopics().all())) == 10


@pytest.mark.parametrize("topic", ["edgeline/v1/plant-a/m01/result/cam1", "edgeline/v1/plant-a/m01/anomaly",
                                   "edgeline/v1/plant-a/m01/cmd/snapshot"])
def test_parse_topic_inverts_the_builders(topic: str) -> None:
    parts = parse_topic(topic)
    assert (parts.site, parts.machine) == ("plant-a", "m01")
    rebuilt = (command_topic(parts.site, parts.machine, parts.name) if parts.kind == "command"
               else mqtt_topic(parts.site, parts.machine, parts.kind, parts.name))
    assert rebuilt == topic


@pytest.mark.parametrize("topic", ["other/v1/a/b/result", "edgeline/v1/a/b", "edgeline/v1/a/b/nope",
                                   "edgeline/v1/a/b/cmd", "edgeline/v1/a/b/result/c/extra"])
def test_parse_topic_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(ValueError):
        parse_topic(topic)
