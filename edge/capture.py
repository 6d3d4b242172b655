"""Camera capture: one object and one supervised thread per camera, feeding a bounded latest-frame queue.

The capture thread never blocks on its consumer: when the queue is full the oldest frame is
dropped and counted. A source that fails is reopened with exponential backoff and jitter, and
the camera's state (ok / reconnecting / failed / stopped) is reported in heartbeats. Sources are
found by their ``type`` in the site file (:data:`CAMERA_SOURCES`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from edge.settings import CameraConfig, SyntheticSource
from models.package.synthetic import SyntheticCamera
from stream.service import Service, Supervisor

log = logging.getLogger(__name__)

CameraState = Literal["ok", "reconnecting", "failed", "stopped"]
FAILED_AFTER_ATTEMPTS = 5
"""Consecutive failed opens after which a camera reports ``failed`` (it keeps retrying)."""


class SourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class CapturedFrame:
    camera: str
    seq: int
    ts: float
    """Capture time, UTC epoch seconds."""
    image: np.ndarray


class FrameSource(Protocol):
    def open(self) -> None: ...
    def read(self) -> np.ndarray: ...
    def close(self) -> None: ...


class SyntheticFrameSource:
    """The synthetic conveyor, moving in real time whatever rate it is read at."""

    def __init__(self, config: SyntheticSource, width: int, height: int, fps: float) -> None:
        self._camera = SyntheticCamera(seed=config.seed, width=width, height=height, fps=fps,
                                       defect_rate=config.defect_rate, part_speed=config.part_speed)
        self._fps = fps
        self._t0 = 0.0

    def open(self) -> None:
        self._t0 = time.monotonic()

    def read(self) -> np.ndarray:
        index = int((time.monotonic() - self._t0) * self._fps)
        return self._camera.frame(index).image

    def close(self) -> None:
        pass


class OpenCvSource:
    """File, RTSP/HTTP URL, USB index or GStreamer pipeline through ``cv2.VideoCapture``."""

    def __init__(self, target: str | int, api: int = cv2.CAP_ANY, loop: bool = False) -> None:
        self._target = target
        self._api = api
        self._loop = loop
        self._capture: cv2.VideoCapture | None = None

    def open(self) -> None:
        self._capture = cv2.VideoCapture(self._target, self._api)
        if not self._capture.isOpened():
            self.close()
            raise SourceError(f"cannot open {self._target!r}")

    def read(self) -> np.ndarray:
        if self._capture is None:
            raise SourceError("source is not open")
        ok, image = self._capture.read()
        if not ok and self._loop:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._capture.read()
        if not ok or image is None:
            raise SourceError(f"no frame from {self._target!r}")
        return image

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


CAMERA_SOURCES: dict[str, Callable[[Any, CameraConfig, Path], FrameSource]] = {
    "synthetic": lambda source, camera, base_dir: SyntheticFrameSource(source, *camera.resolution, camera.fps),
    "file": lambda source, camera, base_dir: OpenCvSource(str(base_dir / source.path), loop=source.loop),
    "rtsp": lambda source, camera, base_dir: OpenCvSource(source.url, cv2.CAP_FFMPEG),
    "usb": lambda source, camera, base_dir: OpenCvSource(source.index, cv2.CAP_V4L2),
    "gstreamer": lambda source, camera, base_dir: OpenCvSource(source.pipeline, cv2.CAP_GSTREAMER),
}
"""Camera source ``type`` in the site file -> (its source settings, the camera, the site folder) -> frame source."""


def make_source(config: CameraConfig, base_dir: Path) -> FrameSource:
    return CAMERA_SOURCES[config.source.type](config.source, config, base_dir)


class Camera(Service):
    """Captures one camera at its fps cap into a bounded queue of the latest frames: a service
    ``capture:<machine>`` whose loop, thread ``capture:<machine>/<camera>``, is supervised (an
    error other than a :class:`SourceError` crashes it; its supervisor restarts it)."""

    def __init__(self, machine: str, config: CameraConfig, source: FrameSource,
                 frame_ready: threading.Event | None = None, supervisor: Supervisor | None = None) -> None:
        super().__init__(f"capture:{machine}", supervisor=supervisor)
        self.machine = machine
        self.config = config
        self.id = config.id
        self.label = f"capture:{machine}/{config.id}"
        """What logs call it (its loop's thread name)."""
        self.state: CameraState = "stopped"
        self.frames_captured = 0
        self.frames_dropped = 0
        self._fps = config.fps
        self._source = source
        self._queue: deque[CapturedFrame] = deque()
        self._queue_size = config.queue_size
        self._lock = threading.Lock()
        self._frame_ready = frame_ready or threading.Event()
        self.add_loop(config.id, self._run)

    @property
    def fps(self) -> float:
        return self._fps

    def set_fps(self, fps: float) -> None:
        if not 0 < fps <= 120:
            raise ValueError(f"fps must be in (0, 120], got {fps}")
        self._fps = fps

    def on_stop(self) -> None:
        self.state = "stopped"

    def take_latest(self) -> CapturedFrame | None:
        """The newest queued frame, or None; the older ones are dropped and counted (inference
        always works on the present, never on a backlog)."""
        with self._lock:
            if not self._queue:
                return None
            self.frames_dropped += len(self._queue) - 1
            frame = self._queue[-1]
            self._queue.clear()
            return frame

    def count_dropped(self, frames: int) -> None:
        with self._lock:
            self.frames_dropped += frames

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def _put(self, frame: CapturedFrame) -> None:
        with self._lock:
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.frames_dropped += 1
            self._queue.append(frame)
        self._frame_ready.set()

    def _run(self) -> None:
        attempts = 0
        while not self.stopping.is_set():
            try:
                self._source.open()
            except SourceError as exc:
                attempts += 1
                self._back_off(attempts, exc)
                continue
            attempts = 0
            self.state = "ok"
            log.info("%s: source open", self.label)
            try:
                self._capture_until_error()
            except SourceError as exc:
                attempts = 1
                self._back_off(attempts, exc)
            finally:
                self._source.close()

    def _capture_until_error(self) -> None:
        next_due = time.monotonic()
        while not self.stopping.is_set():
            image = self._source.read()
            self._put(CapturedFrame(self.id, self.frames_captured, time.time(), image))
            self.frames_captured += 1
            next_due += 1.0 / self._fps
            now = time.monotonic()
            if next_due < now - 1.0 / self._fps:  # fell behind: do not burst to catch up
                next_due = now
            self.stopping.wait(max(0.0, next_due - now))

    def _back_off(self, attempts: int, exc: Exception) -> None:
        self.state = "failed" if attempts >= FAILED_AFTER_ATTEMPTS else "reconnecting"
        delay = min(10.0, 0.25 * 2 ** (attempts - 1)) * random.uniform(0.8, 1.2)
        log.warning("%s: %s; %s, retry in %.1f s", self.label, exc, self.state, delay)
        self.stopping.wait(delay)
