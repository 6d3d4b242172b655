"""The outbox forwarder against a real Mosquitto: every row arrives, rows leave the store only on
PUBACK, and a broker stopped mid-stream for a few seconds loses nothing."""

from __future__ import annotations

import time

import pytest

from edge.outbox import Forwarder, Outbox, Priority
from stream.mqtt import MqttClient, MqttSettings

pytestmark = pytest.mark.integration


def _received_ids(probe, expected: int, timeout: float) -> set[int]:
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        try:
            got.add(int(probe.get(timeout=max(0.1, deadline - time.monotonic())).payload))
        except TimeoutError:
            break
    return got


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_forwarder_delivers_everything_and_empties_the_outbox(mosquitto, mqtt_probe, unique_name, tmp_path):
    probe = mqtt_probe(mosquitto)
    probe.subscribe(f"{unique_name}/#")
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(300):
        box.put(f"{unique_name}/r", str(i).encode(), Priority.RESULT)
    client = MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port), f"{unique_name}-edge")
    forwarder = Forwarder(box, client, unique_name, window=50)
    client.start()
    forwarder.start()
    try:
        assert _received_ids(probe, 300, 20) == set(range(300))
        assert _wait(lambda: box.depth == 0, 10), box.depth
        assert box.acked == 300
    finally:
        forwarder.stop()
        client.stop()


def test_broker_outage_mid_stream_loses_nothing(restartable_mosquitto, mqtt_probe, unique_name, tmp_path):
    probe = mqtt_probe(restartable_mosquitto, clean_session=False)
    probe.subscribe(f"{unique_name}/#")
    box = Outbox(tmp_path / "o.sqlite")
    client = MqttClient(MqttSettings(host=restartable_mosquitto.host, port=restartable_mosquitto.port, reconnect_max_s=1),
                        f"{unique_name}-edge")
    forwarder = Forwarder(box, client, unique_name, window=20)
    client.start()
    forwarder.start()
    try:
        client.wait_connected()
        for i in range(400):
            box.put(f"{unique_name}/r", str(i).encode(), Priority.RESULT)
            forwarder.notify()
            if i == 150:
                restartable_mosquitto._stop_process()  # SIGTERM: sessions saved, port kept for the restart
            if i == 300:
                assert box.depth >= 140  # what came during the outage waits in the store
                time.sleep(2)
                restartable_mosquitto.start()
            time.sleep(0.005)
        assert _received_ids(probe, 400, 30) == set(range(400))
        assert _wait(lambda: box.depth == 0, 15), box.depth
    finally:
        forwarder.stop()
        client.stop()


def test_heartbeats_and_metrics_show_how_long_the_oldest_message_has_waited(restartable_mosquitto, mqtt_probe,
                                                                           unique_name, tmp_path):
    """A real agent through a broker outage: the age of its oldest stored message grows while the
    broker is down (metrics and the heartbeats sent after it), and is 0 again once the outbox drained."""
    from edge.agent import EdgeAgent
    from edgeline.services import scrape_metrics
    from stream.messages import parse_message
    from stream.topics import site_filter
    from tests.conftest import edge_site

    broker = restartable_mosquitto
    config = edge_site(broker, unique_name, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"],
                                                                                "fps": 5}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}})
    config = config.model_copy(update={"broker": config.broker.model_copy(update={"reconnect_max_s": 1})})
    probe = mqtt_probe(broker, clean_session=False)
    probe.subscribe(site_filter(unique_name))
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=0.5)
    agent.start()
    age = 'edgeline_edge_outbox_oldest_age_seconds{machine="m1"}'
    try:
        assert _wait(lambda: agent.outbox.acked > 0, 20), "nothing published"
        assert scrape_metrics(agent.metrics_port)[age] < 1.0
        broker._stop_process()
        down_at = time.monotonic()
        assert _wait(lambda: scrape_metrics(agent.metrics_port)[age] >= 2.0, 20), "the age did not grow"
        assert scrape_metrics(agent.metrics_port)[age] <= time.monotonic() - down_at + 1.0
        broker.start()
        assert _wait(lambda: agent.outbox.depth == 0 and scrape_metrics(agent.metrics_port)[age] == 0.0, 30)
        beats: list[float] = []
        deadline = time.monotonic() + 20
        while not beats or beats[-1] > 0:  # one built during the outage, then one after the outbox drained
            assert time.monotonic() < deadline, f"no heartbeat with an empty outbox after the outage: {beats}"
            message = probe.get(timeout=10)
            if message.topic.endswith("/heartbeat"):
                beats.append(parse_message(message.payload).outbox_oldest_age_s)
        assert max(beats) >= 2.0, beats
    finally:
        agent.stop()
