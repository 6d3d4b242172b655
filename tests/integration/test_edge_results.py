"""What a running agent publishes: results grouped per camera per window, the image-level alarm,
and camera states in heartbeats as a file source dies and comes back (real Mosquitto, real
OpenCV decoding, real ONNX Runtime)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.agent import EdgeAgent
from stream.messages import Heartbeat, Result, parse_message
from tests.conftest import edge_site

pytestmark = pytest.mark.integration

SEG = {"seg": {"path": "builtin:seg-synth-int8"}}


def collect_until(probe, received: list, done, timeout: float) -> None:
    """Append parsed messages to ``received`` until ``done(received)``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done(received):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s ({len(received)} messages)")
        try:
            received.append(parse_message(probe.get(timeout=0.1).payload))
        except TimeoutError:
            continue


def frames_of(messages: list, camera: str) -> list:
    return [f for m in messages if isinstance(m, Result) and m.camera == camera for f in m.frames]


def test_results_are_grouped_per_camera_per_window(mosquitto, mqtt_probe, unique_name, tmp_path):
    site, window_s, cameras = unique_name, 0.5, ("c0", "c1")
    config_cameras = [{"id": c, "models": ["seg"], "fps": 10, "source": {"type": "synthetic", "seed": i,
                                                                       "defect_rate": 0.5}}
                      for i, c in enumerate(cameras)]
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": config_cameras}], SEG,
                       inference={"result_window_ms": window_s * 1000})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(f"edgeline/v1/{site}/m1/result/#")
    agent = EdgeAgent(config, "m1", heartbeat_s=1.0)
    received: list = []
    started = time.monotonic()
    agent.start()
    try:  # however slow the machine (or the overload shedder): 20 frames of each camera and an alarm
        collect_until(probe, received, lambda got: all(len(frames_of(got, c)) >= 20 for c in cameras)
                      and any(o.alarm for c in cameras for f in frames_of(got, c) for o in f.outputs), 60.0)
    finally:
        agent.stop()
    ran_s = time.monotonic() - started
    published = {c: agent.vision.camera_counters[c].results_published for c in cameras}
    collect_until(probe, received, lambda got: all(len(frames_of(got, c)) >= published[c] for c in cameras), 10.0)
    for camera in cameras:
        mine = [r for r in received if isinstance(r, Result) and r.camera == camera]
        seqs = [f.seq for f in frames_of(received, camera)]
        assert len(seqs) == len(set(seqs)) == published[camera] >= 20
        assert seqs == sorted(seqs)
        # a window opens at most once per window_s of the run: one message per window, not per frame
        assert len(mine) <= ran_s / window_s + 1, (len(mine), ran_s)
        assert all(r.ts == r.frames[0].ts for r in mine)
    outputs = [o for c in cameras for f in frames_of(received, c) for o in f.outputs]
    assert all(o.alarm == bool(o.regions) for o in outputs)  # seg-synth has no calibrated area alarm


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
        inferred_before = agent.vision.camera_counters["cam"].frames_inferred
        deadline = time.monotonic() + 10.0  # the new clip is inferred again
        while agent.vision.camera_counters["cam"].frames_inferred <= inferred_before:
            assert time.monotonic() < deadline, "no frame inferred from the new clip within 10 s"
            time.sleep(0.05)
    finally:
        agent.stop()
    assert states[:4] == ["ok", "reconnecting", "failed", "ok"], states
