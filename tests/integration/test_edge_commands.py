"""Commands from central change a running agent: the change gate and the frame rate, live."""

from __future__ import annotations

import time

import pytest

from edge.agent import EdgeAgent
from stream.messages import Command, Event, Heartbeat, Result, parse_message
from stream.topics import command_topic, site_filter
from tests.conftest import edge_site

pytestmark = pytest.mark.integration


def wait_for(probe, predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = parse_message(probe.get(timeout=max(0.05, deadline - time.monotonic())).payload)
        except (TimeoutError, ValueError):
            continue
        if predicate(message):
            return message
    raise AssertionError("expected message never came")


def test_set_gate_and_set_fps_apply_live(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"], "fps": 10}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", heartbeat_s=0.5)
    agent.start()
    try:
        wait_for(probe, lambda m: isinstance(m, Result))
        assert agent.vision.gates["c1"].gated == 0
        command = Command(site=site, machine="m1", ts=time.time(), name="set_gate", args={"threshold": 60})
        probe.publish(command_topic(site, "m1", "set_gate"), command.to_json())
        applied = wait_for(probe, lambda m: isinstance(m, Event) and m.details.get("command_id") == command.msg_id)
        assert applied.name == "command_applied", applied.text
        reused = wait_for(probe, lambda m: isinstance(m, Result) and m.frames[0].outputs[0].reused)
        assert reused.frames[0].outputs[0].latency_ms == 0.0
        wait_for(probe, lambda m: isinstance(m, Heartbeat) and m.cameras[0].frames_gated > 3)

        slow = Command(site=site, machine="m1", ts=time.time(), name="set_fps", camera="c1", args={"fps": 2})
        probe.publish(command_topic(site, "m1", "set_fps"), slow.to_json())
        wait_for(probe, lambda m: isinstance(m, Heartbeat) and m.cameras[0].fps == 2.0)

        bad = Command(site=site, machine="m1", ts=time.time(), name="set_gate", args={"threshold": 999})
        probe.publish(command_topic(site, "m1", "set_gate"), bad.to_json())
        rejected = wait_for(probe, lambda m: isinstance(m, Event) and m.details.get("command_id") == bad.msg_id)
        assert rejected.name == "command_rejected" and "within 0..255" in rejected.text
        assert agent.vision.gates["c1"].threshold == 60
    finally:
        agent.stop()
