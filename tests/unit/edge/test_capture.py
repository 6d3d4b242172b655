"""Camera capture: bounded drop-oldest queue, fps cap, reconnects with states (scripted source)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.capture import Camera, SourceError
from edge.settings import CameraConfig


class ScriptedSource:
    """A named fake camera: fails to open ``open_failures`` times, then dies after ``frames_per_open`` frames."""

    def __init__(self, open_failures: int = 0, frames_per_open: int | None = None) -> None:
        self.open_failures = open_failures
        self.frames_per_open = frames_per_open
        self.opens = 0
        self.reads_since_open = 0
        self.closed = 0
        self.read_times: list[float] = []
        """``time.monotonic()`` of every read, so pacing is checked on the capture's own clock."""
        self.camera: Camera | None = None
        self.camera_states: list[str] = []
        """The camera's state at each open and read, recorded from inside its capture thread."""

    def open(self) -> None:
        self._record_state()
        self.opens += 1
        if self.opens <= self.open_failures:
            raise SourceError("scripted: device busy")
        self.reads_since_open = 0

    def read(self) -> np.ndarray:
        self._record_state()
        if self.frames_per_open is not None and self.reads_since_open >= self.frames_per_open:
            raise SourceError("scripted: stream ended")
        self.reads_since_open += 1
        self.read_times.append(time.monotonic())
        return np.full((4, 4, 3), self.reads_since_open, np.uint8)

    def _record_state(self) -> None:
        if self.camera is not None and (not self.camera_states or self.camera_states[-1] != self.camera.state):
            self.camera_states.append(self.camera.state)

    def close(self) -> None:
        self.closed += 1


def camera(source: ScriptedSource, fps: float = 120.0, queue_size: int = 3) -> Camera:
    source.camera = Camera("m1", CameraConfig(id="c1", fps=fps, queue_size=queue_size, resolution=(4, 4)), source)
    return source.camera


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_full_queue_drops_the_oldest_and_counts() -> None:
    cam = camera(ScriptedSource(), fps=120.0, queue_size=3)
    cam.start()
    try:
        wait_until(lambda: cam.frames_captured >= 30)
    finally:
        cam.stop()
    assert cam.queue_depth() == 3
    assert cam.frames_dropped == cam.frames_captured - 3
    assert cam.take_latest().seq == cam.frames_captured - 1  # the newest; the two older ones count as dropped
    assert cam.frames_dropped == cam.frames_captured - 1
    assert cam.take_latest() is None


def test_thread_is_named_after_machine_and_camera() -> None:
    cam = camera(ScriptedSource(), fps=50)
    cam.start()
    try:
        assert any(t.name == "capture:m1/c1" for t in threading.enumerate())
    finally:
        cam.stop()
    assert cam.state == "stopped"
    assert not any(t.name == "capture:m1/c1" for t in threading.enumerate())


def assert_never_faster_than(read_times: list[float], fps: float) -> None:
    """The n-th read after the first comes no earlier than n periods after it (a few ms of timer
    slack): the cap holds over every span, however late a read was (no catch-up burst beats it)."""
    first = read_times[0]
    early = [n for n, t in enumerate(read_times) if t - first < n / fps - 0.005]
    assert not early, f"reads {early[:5]} came before the {fps:g} fps cap allows"


def test_fps_cap_paces_capture() -> None:
    source = ScriptedSource()
    cam = camera(source, fps=20.0)
    cam.start()
    try:
        wait_until(lambda: cam.frames_captured >= 15, timeout=10.0)  # 0.7 s at 20 fps
    finally:
        cam.stop()
    assert len(source.read_times) == cam.frames_captured >= 15
    assert_never_faster_than(source.read_times, 20.0)


def test_reconnects_after_open_failures_and_stream_end() -> None:
    source = ScriptedSource(open_failures=2, frames_per_open=5)
    cam = camera(source, fps=120.0)
    cam.start()
    try:
        wait_until(lambda: source.opens >= 5, timeout=10.0)  # 2 failed opens, then 2 streams that end
    finally:
        cam.stop()
    assert source.camera_states[:4] == ["stopped", "reconnecting", "ok", "reconnecting"]
    assert cam.frames_captured >= 10  # frames from more than one connection


def test_persistent_failure_is_reported_as_failed() -> None:
    source = ScriptedSource(open_failures=10_000)
    cam = camera(source)
    cam.start()
    try:
        wait_until(lambda: cam.state == "failed", timeout=10.0)
    finally:
        cam.stop()
    assert cam.frames_captured == 0


def test_set_fps_validates_and_applies_live() -> None:
    source = ScriptedSource()
    cam = camera(source, fps=1.0)
    with pytest.raises(ValueError):
        cam.set_fps(0)
    cam.start()
    try:
        wait_until(lambda: cam.frames_captured >= 1)
        cam.set_fps(100.0)
        # after the 1 s wait already under way: 20 frames take 0.2 s at 100 fps, 20 s at the old 1 fps
        wait_until(lambda: cam.frames_captured >= 22, timeout=10.0)
    finally:
        cam.stop()
    assert cam.fps == 100.0
    assert_never_faster_than(source.read_times[1:], 100.0)


def test_take_latest_keeps_the_newest_and_counts_the_rest_as_dropped():
    import threading

    from edge.capture import Camera, CapturedFrame
    from edge.settings import CameraConfig

    camera = Camera("m1", CameraConfig(id="c1", fps=10, resolution=(32, 24), queue_size=4), None, threading.Event())
    for seq in range(3):
        camera._put(CapturedFrame("c1", seq, float(seq), None))
    assert camera.take_latest().seq == 2
    assert camera.frames_dropped == 2 and camera.queue_depth() == 0 and camera.take_latest() is None


def test_every_camera_source_type_has_a_factory(tmp_path) -> None:
    """The registry by ``type`` covers every source the site file may name, and builds the right reader."""
    from typing import get_args

    import cv2

    from edge.capture import CAMERA_SOURCES, OpenCvSource, SyntheticFrameSource, make_source
    from edge.settings import CameraSource

    kinds = [get_args(model.model_fields["type"].annotation)[0] for model in get_args(get_args(CameraSource)[0])]
    assert sorted(CAMERA_SOURCES) == sorted(kinds)
    made = {kind: make_source(CameraConfig.model_validate({"id": "c1", "source": source}), tmp_path)
            for kind, source in [("synthetic", {"type": "synthetic"}), ("file", {"type": "file", "path": "a.avi"}),
                                 ("rtsp", {"type": "rtsp", "url": "rtsp://cam/1"}), ("usb", {"type": "usb", "index": 2}),
                                 ("gstreamer", {"type": "gstreamer", "pipeline": "videotestsrc ! appsink"})]}
    assert isinstance(made.pop("synthetic"), SyntheticFrameSource)
    assert {kind: (s._target, s._api) for kind, s in made.items() if isinstance(s, OpenCvSource)} == {
        "file": (str(tmp_path / "a.avi"), cv2.CAP_ANY), "rtsp": ("rtsp://cam/1", cv2.CAP_FFMPEG),
        "usb": (2, cv2.CAP_V4L2), "gstreamer": ("videotestsrc ! appsink", cv2.CAP_GSTREAMER)}
