"""Sensor gateways publishing JSON on MQTT feed the streaming model, on SKAB's channels or a plant's own;
missing keys become missing values, out-of-range values are counted, bad payloads are counted and
skipped, and the agent goes on."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge.agent import EdgeAgent
from models.package.synthetic import CHANNELS, SyntheticPump
from stream.messages import Anomaly, parse_message
from stream.topics import mqtt_topic
from tests.conftest import edge_site

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def collect_anomalies(probe, count: int, timeout: float = 10.0) -> list[Anomaly]:  # noqa: ANN001 - MqttProbe
    scores: list[Anomaly] = []
    deadline = time.monotonic() + timeout
    while len(scores) < count and time.monotonic() < deadline:
        message = parse_message(probe.get(timeout=max(0.01, deadline - time.monotonic())).payload)
        if isinstance(message, Anomaly):
            scores.append(message)
    return scores


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
                probe.publish(feed_topic, json.dumps({"Flow": 1.0}))  # none of the channels
            time.sleep(0.05)
        scores = collect_anomalies(probe, 40)
    finally:
        agent.stop()
    feed = agent.sensing.sensor_sources["pump1"]
    assert feed.counters.bad_payloads == 4 and feed.received >= 55
    assert len(scores) >= 40 and {s.group for s in scores} == {"pump1"}
    assert agent.sensing.sensor_counters["pump1"].steps >= len(scores)  # one model step per fresh sample, none without
    assert agent.sensing.sensor_counters["pump1"].steps <= feed.received


def test_a_plants_own_three_channels_over_mqtt(mosquitto, mqtt_probe, unique_name, tmp_path: Path):
    """A press with 3 channels of its own names (a tiny 3-channel package), published under the gateway's
    own JSON keys: each sample is stepped before the next is sent, so every count is exact."""
    pytest.importorskip("onnx")
    from tests.tiny_anomaly import write_tiny_anomaly_package

    write_tiny_anomaly_package(tmp_path / "press-pkg", ["load", "pressure", "motor_temp"], name="press")
    site, feed_topic = unique_name, f"{unique_name}/gateway/press3"
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "sensors": [{
        "id": "press3", "model": "press", "rate_hz": 50, "source": {"type": "mqtt", "topic": feed_topic},
        "channels": [{"name": "motor_temp", "field": "T_motor", "unit": "degC", "min": -20, "max": 150},
                     {"name": "load", "field": "load_pct"}, {"name": "pressure", "field": "p_bar"}]}]}],
        {"press": {"path": "press-pkg"}}, signatures={"require": False})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(mqtt_topic(site, "m1", "anomaly"))
    agent = EdgeAgent(config, "m1", base_dir=tmp_path)
    agent.start()
    counters, feed = agent.sensing.sensor_counters["press3"], agent.sensing.sensor_sources["press3"]
    rng = np.random.default_rng(2)
    try:
        # until the agent's subscription is up: payloads it counts as bad and never steps on
        wait_for(lambda: probe.publish(feed_topic, b"{}") or feed.counters.bad_payloads >= 1, "the subscription")
        for i in range(40):
            load, p_bar, temp = 50 + rng.normal(), 2 + 0.1 * rng.normal(), 40 + 0.1 * rng.normal()
            sample = {"load_pct": load, "p_bar": p_bar, "T_motor": temp}
            if i == 10:
                del sample["p_bar"]  # a missing value
            if i == 20:
                sample["T_motor"] = 900.0  # a broken probe: out of range
            if i == 30:
                bad = feed.counters.bad_payloads
                probe.publish(feed_topic, b"[1, 2]")  # not an object: bad, skipped
                wait_for(lambda: feed.counters.bad_payloads == bad + 1, "the bad payload to be counted")
            before = counters.steps
            probe.publish(feed_topic, json.dumps(sample))
            wait_for(lambda before=before: counters.steps > before, f"sample {i} to be stepped")
        scores = collect_anomalies(probe, counters.steps)
    finally:
        agent.stop()
    batch = agent.sensing.channel_batches["press"]
    assert batch.counts("press3") == (1, 1)  # (missing, out of range)
    assert feed.counters.bad_payloads == bad + 1
    assert len(scores) == counters.steps == 40 and [s.seq for s in scores] == list(range(len(scores)))
    assert all(set(s.channel_scores) == {"load", "pressure", "motor_temp"} for s in scores)
    assert scores[-1].model == "press" and set(scores[-1].top_channels) <= {"load", "pressure", "motor_temp"}
