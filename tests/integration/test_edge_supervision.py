"""Supervision in a running agent (real Mosquitto, real ONNX Runtime): a sensor source that raises kills
the sensing loop's step; the supervisor restarts it, the restart shows on the agent's metrics endpoint
(``edgeline_edge_restarts_total{service}``) and in the heartbeats it publishes, and scoring goes on."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge.agent import EdgeAgent
from edge.sensors import SensorSource
from edgeline.services import scrape_metrics
from stream.messages import Anomaly, Heartbeat, parse_message
from stream.topics import site_filter
from tests.conftest import edge_site

pytestmark = pytest.mark.integration

STEP = "sensing:m1/step"


class FailsOnce:
    """The pump, except that its ``fail_at``-th read raises (a sensor bus timing out)."""

    def __init__(self, source: SensorSource, fail_at: int = 20) -> None:
        self.source, self.rate_hz, self.counters = source, source.rate_hz, source.counters
        self.reads, self.fail_at = 0, fail_at

    def next_sample(self) -> np.ndarray | None:
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError("scripted: the sensor bus timed out")
        return self.source.next_sample()


def test_a_crashed_loop_is_restarted_counted_and_reported(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"], "fps": 5}],
                                                   "sensors": [{"id": "pump1", "model": "skab", "rate_hz": 50}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}, "skab": {"path": "builtin:anomaly-skab"}})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=0.5)
    faulty = agent.sensing.sensor_sources["pump1"] = FailsOnce(agent.sensing.sensor_sources["pump1"])
    agent.start()
    try:
        beat, seqs = None, []
        deadline = time.monotonic() + 30
        while beat is None or len(seqs) < 40:
            assert time.monotonic() < deadline, f"no heartbeat with the restart, or too few scores ({len(seqs)})"
            try:
                raw = probe.get(timeout=0.5)
            except TimeoutError:
                continue
            if raw.topic.endswith("/status"):
                continue
            message = parse_message(raw.payload)
            if isinstance(message, Anomaly):
                seqs.append(message.seq)
            elif isinstance(message, Heartbeat) and message.restarts.get(STEP):
                beat = message
        scraped = scrape_metrics(agent.metrics_port)
    finally:
        agent.stop()
    assert faulty.reads > faulty.fail_at
    assert beat.restarts[STEP] == 1 and beat.restarts["vision:m1/infer"] == 0
    assert scraped[f'edgeline_edge_restarts_total{{service="{STEP}"}}'] == 1
    assert scraped['edgeline_edge_restarts_total{service="capture:m1/c1"}'] == 0
    assert sorted(seqs) == list(range(len(seqs)))  # the restarted loop went on where it was: no seq lost or repeated
