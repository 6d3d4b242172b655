"""Sensor gateways publishing JSON on MQTT feed the streaming LSTM; bad payloads are counted and
skipped, and the agent goes on."""

from __future__ import annotations

import json
import time

import pytest

from edge.agent import EdgeAgent
from edge.synthetic import CHANNELS, SyntheticPump
from stream.messages import Anomaly, parse_message
from stream.topics import mqtt_topic
from tests.conftest import edge_site

pytestmark = pytest.mark.integration


def test_gateway_samples_become_anomaly_scores(mosquitto, mqtt_probe, unique_name, tmp_path):
    site, feed_topic = unique_name, f"{unique_name}/gateway/pump1"
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "sensors": [
        {"id": "pump1", "model": "anomaly", "rate_hz": 50, "source": {"type": "mqtt", "topic": feed_topic}}]}],
        {"anomaly": {"path": "builtin:anomaly-skab", "profile": "fast-start"}})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(mqtt_topic(site, "m1", "anomaly"))
    agent = EdgeAgent(config, "m1")
    agent.start()
    try:
        pump = SyntheticPump(seed=4, rate_hz=20, anomaly_rate=0.0)
        for i in range(60):
            values, _ = pump.sample(i)
            probe.publish(feed_topic, json.dumps(dict(zip(CHANNELS, map(float, values)))))
            if i in (10, 20):
                probe.publish(feed_topic, b"not json")
                probe.publish(feed_topic, json.dumps({"Current": 1.0}))  # channels missing
            time.sleep(0.05)
        scores = []
        deadline = time.monotonic() + 10
        while len(scores) < 40 and time.monotonic() < deadline:
            message = parse_message(probe.get(timeout=deadline - time.monotonic()).payload)
            if isinstance(message, Anomaly):
                scores.append(message)
    finally:
        agent.stop()
    feed = agent.sensor_sources["pump1"]
    assert feed.bad == 4 and feed.received >= 55
    assert len(scores) >= 40 and {s.group for s in scores} == {"pump1"}
    assert agent.sensor_counters["pump1"].steps >= len(scores)  # one LSTM step per fresh sample, none without
    assert agent.sensor_counters["pump1"].steps <= feed.received
