"""Heartbeats without a broker: what they carry (cameras, outbox, models, restarts), when they go out
(every interval and once on stop), and that a heartbeat from before ``restarts`` existed still parses."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge.heartbeat import HeartbeatPipeline
from edge.metrics import EdgeMetrics
from edge.ota import ModelSwapper
from edge.outbox import Outbox, Priority
from edge.publisher import MemoryPublisher
from edge.settings import CameraConfig, InferenceConfig
from edge.vision import VisionPipeline
from stream.messages import Heartbeat, parse_message
from stream.service import Supervisor


def test_heartbeats_every_interval_and_on_stop(tmp_path: Path) -> None:
    publisher = MemoryPublisher()
    swapper = ModelSwapper({}, None, providers={}, threads={}, downloads=tmp_path)
    vision = VisionPipeline("s1", "m1", [CameraConfig(id="c1", fps=7)], lambda cam: None,  # type: ignore[arg-type,return-value]
                            swapper, InferenceConfig(), 1 << 20, publisher, EdgeMetrics())
    outbox = Outbox(tmp_path / "outbox.sqlite", 100)
    outbox.put("t", b"{}", Priority.RESULT)
    supervisor = Supervisor("edge", registry=CollectorRegistry())
    supervisor.watch("sensing:m1/step")
    supervisor.crashed("sensing:m1/step", OSError("scripted"))
    beats = HeartbeatPipeline("s1", "m1", 0.05, vision, outbox, supervisor, publisher)
    beats.start()
    try:
        deadline = time.monotonic() + 10
        while len(publisher.of(Heartbeat)) < 2:
            assert time.monotonic() < deadline, "fewer than 2 heartbeats in 10 s"
            time.sleep(0.01)
    finally:
        beats.stop()
        outbox.close()
    sent = publisher.of(Heartbeat)
    last = sent[-1]  # the one stop() sends
    assert (last.site, last.machine, last.outbox_depth) == ("s1", "m1", 1)
    assert [(c.camera, c.fps, c.state) for c in last.cameras] == [("c1", 7.0, "stopped")]
    assert last.restarts == {"sensing:m1/step": 1, "heartbeat:m1/publish": 0}
    assert parse_message(last.to_json()) == last


def test_a_heartbeat_without_restarts_still_parses() -> None:
    old = json.dumps({"schema": "edgeline.heartbeat/1", "msg_id": "a" * 32, "site": "s1", "machine": "m1",
                      "ts": time.time(), "uptime_s": 3.0})
    beat = parse_message(old)
    assert isinstance(beat, Heartbeat) and beat.restarts == {}
