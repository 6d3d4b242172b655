"""What a running agent publishes: results grouped per camera per window, the image-level alarm,
and camera states in heartbeats as a file source dies and comes back (real Mosquitto, real
OpenCV decoding, real ONNX Runtime)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from edge.agent import EdgeAgent
from stream.messages import Heartbeat, Result, parse_message
from tests.conftest import edge_site

SEG = {"seg": {"path": "builtin:seg-synth-int8"}}


def collect(probe, seconds: float) -> list:
    messages, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            messages.append(parse_message(probe.get(timeout=0.1).payload))
        except TimeoutError:
            continue
    return messages


def test_results_are_grouped_per_camera_per_window(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    cameras = [{"id": f"c{i}", "models": ["seg"], "fps": 10, "source": {"type": "synthetic", "seed": i,
                                                                       "defect_rate": 0.5}} for i in range(2)]
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": cameras}], SEG,
                       inference={"result_window_ms": 500})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(f"edgeline/v1/{site}/m1/result/#")
    agent = EdgeAgent(config, "m1", heartbeat_s=1.0)
    agent.start()
    time.sleep(4.0)
    agent.stop()
    results = [m for m in collect(probe, 2.0) if isinstance(m, Result)]
    published = {c: agent.camera_counters[c].results_published for c in ("c0", "c1")}
    for camera in ("c0", "c1"):
        mine = [r for r in results if r.camera == camera]
        seqs = [f.seq for r in mine for f in r.frames]
        assert len(seqs) == len(set(seqs)) == published[camera] >= 20
        assert seqs == sorted(seqs)
        assert len(mine) <= 10  # ~4 s in 0.5 s windows, not one message per frame
        assert all(r.ts == r.frames[0].ts and r.frames[-1].ts - r.frames[0].ts < 0.6 for r in mine)
    outputs = [o for r in results for f in r.frames for o in f.outputs]
    assert all(o.alarm == bool(o.regions) for o in outputs)  # seg-synth has no calibrated area alarm
    assert any(o.alarm for o in outputs)


def write_clip(path: Path, frames: int = 15) -> None:
    """A short MJPG clip, written beside ``path`` and renamed into place (never seen half-written)."""
    partial = path.with_suffix(".partial.avi")
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 96))
    for i in range(frames):
        writer.write(np.full((96, 96, 3), 10 * i % 255, np.uint8))
    writer.release()
    partial.rename(path)


def test_file_camera_that_dies_and_comes_back_shows_its_states_in_heartbeats(
        mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    clip = tmp_path / "line.avi"
    write_clip(clip)
    cameras = [{"id": "cam", "models": ["seg"], "fps": 10, "resolution": [96, 96],
                "source": {"type": "file", "path": clip.name, "loop": False}}]
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": cameras}], SEG)
    probe = mqtt_probe(mosquitto)
    probe.subscribe(f"edgeline/v1/{site}/m1/heartbeat")
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=0.25)
    states: list[str] = []

    def watch(until: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = parse_message(probe.get(timeout=0.2).payload)
            except TimeoutError:
                continue
            if isinstance(message, Heartbeat):
                if not states or states[-1] != message.cameras[0].state:
                    states.append(message.cameras[0].state)
                if states[-1] == until:
                    return
        raise AssertionError(f"camera never reached {until!r}; states seen: {states}")

    agent.start()
    try:
        watch("ok", 10.0)
        clip.unlink()  # the clip plays out (1.5 s) and cannot be reopened
        watch("failed", 15.0)
        write_clip(clip)
        watch("ok", 15.0)
        inferred_before = agent.camera_counters["cam"].frames_inferred
        time.sleep(0.8)
        assert agent.camera_counters["cam"].frames_inferred > inferred_before
    finally:
        agent.stop()
    assert states[:4] == ["ok", "reconnecting", "failed", "ok"], states
