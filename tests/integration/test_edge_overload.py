"""The overload policy inside a running agent: with a busy threshold this low, any work is an
overload, so the lowest-priority camera is shed, reported, and served one frame in a few."""

from __future__ import annotations

import time

import pytest

from edge.agent import EdgeAgent
from stream.messages import Event, Heartbeat, parse_message
from stream.topics import site_filter
from tests.conftest import edge_site

pytestmark = pytest.mark.integration


def test_lowest_priority_camera_is_shed_and_reported(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    cameras = [{"id": cid, "models": ["seg"], "fps": 10, "priority": prio, "source": {"type": "synthetic", "seed": i}}
               for i, (cid, prio) in enumerate((("inspect", 5), ("overview", -1), ("side", 0)))]
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": cameras}],
                       {"seg": {"path": "builtin:seg-synth-int8"}},
                       inference={"overload_high": 0.001, "overload_low": 0.0005})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", heartbeat_s=0.5)
    agent.start()
    try:
        shed_events, beat = [], None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (shed_events and beat):
            raw = probe.get(timeout=deadline - time.monotonic())
            if raw.topic.endswith("/status"):
                continue
            message = parse_message(raw.payload)
            if isinstance(message, Event) and message.name == "overload_shed":
                shed_events.append(message)
            if shed_events and isinstance(message, Heartbeat) and any(c.shed for c in message.cameras):
                beat = message
        assert shed_events and shed_events[0].camera == "overview", shed_events
        assert "one frame in" in shed_events[0].text
        assert {c.camera for c in beat.cameras if c.shed} <= {"overview", "side"}
        inferred_before = {c: agent.vision.camera_counters[c].frames_inferred for c in ("inspect", "overview")}
        time.sleep(2)
        gained = {c: agent.vision.camera_counters[c].frames_inferred - inferred_before[c] for c in inferred_before}
        assert gained["overview"] < gained["inspect"] / 2, gained
        assert "inspect" not in agent.vision.shedder.shed  # the last camera is never shed
    finally:
        agent.stop()
