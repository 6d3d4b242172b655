"""A real agent on a real Mosquitto refuses a mask that would take its result over the message size
limit (issue 13): the result goes out without it, the refusal is counted, nothing oversized is
published."""

from __future__ import annotations

import time

import pytest

from edge.agent import EdgeAgent
from edgeline.services import scrape_metrics
from stream.messages import Command, Event, Result, parse_message
from stream.topics import command_topic, site_filter
from tests.conftest import edge_site

pytestmark = pytest.mark.integration

LIMIT = 4096


def test_a_mask_over_the_size_limit_is_refused_at_the_edge(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    camera = {"id": "c1", "models": ["seg"], "fps": 4, "resolution": [1280, 960],
              "source": {"type": "synthetic", "seed": 7, "defect_rate": 0.9, "part_speed": 0.3}}
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [camera]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}}, messages={"max_bytes": LIMIT})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", heartbeat_s=0.5)
    agent.start()
    try:
        received = []

        def wait_for(predicate, timeout: float = 20.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    raw = probe.get(timeout=max(0.05, deadline - time.monotonic()))
                except TimeoutError:
                    continue
                if raw.topic.endswith("/status"):
                    continue
                message = parse_message(raw.payload)
                received.append((len(raw.payload), message))
                if predicate(message):
                    return message
            raise AssertionError("expected message never came")

        wait_for(lambda m: isinstance(m, Result))
        snapshot = Command(site=site, machine="m1", ts=time.time(), name="snapshot", camera="c1")
        probe.publish(command_topic(site, "m1", "snapshot"), snapshot.to_json())
        wait_for(lambda m: isinstance(m, Event) and m.details.get("command_id") == snapshot.msg_id)
        deadline = time.monotonic() + 20
        while agent.vision.camera_counters["c1"].masks_refused == 0:
            assert time.monotonic() < deadline, "no mask was refused"
            time.sleep(0.05)
        refused_at = time.time()
        wait_for(lambda m: isinstance(m, Result) and m.ts > refused_at)
        scraped = scrape_metrics(agent.metrics_port)
    finally:
        agent.stop()
    assert scraped['edgeline_edge_masks_refused_total{camera="c1",machine="m1",reason="size"}'] == 1
    results = [(size, m) for size, m in received if isinstance(m, Result)]
    assert all(size <= LIMIT for size, _ in results)
    assert not any(o.mask for _, m in results for f in m.frames for o in f.outputs)
