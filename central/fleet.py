"""What the console shows of the fleet between database reads: each machine's latest heartbeat and,
per camera, an hour of samples (one per heartbeat) of its latest defect ratio and its alarmed-frame
count, from which the alarm rate is read. Fed by :class:`central.rollouts.RolloutManager`, which
has already checked the heartbeat's identity; held in memory (a restart starts the hour again)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from stream.messages import Heartbeat

SERIES_S = 3600.0
MAX_SAMPLES = 2000
"""Per camera: an hour at one heartbeat every 2 s."""


@dataclass(frozen=True)
class Sample:
    ts: float
    defect_ratio: float
    defect_frames: int
    frames_inferred: int


class FleetStatus:
    """Latest heartbeats and per-camera series (see the module docstring); thread-safe."""

    def __init__(self) -> None:
        self.heartbeats: dict[str, Heartbeat] = {}
        self._series: dict[tuple[str, str], deque[Sample]] = {}
        self._lock = threading.Lock()

    def on_heartbeat(self, beat: Heartbeat) -> None:
        with self._lock:
            self.heartbeats[beat.machine] = beat
            for camera in beat.cameras:
                series = self._series.setdefault((beat.machine, camera.camera), deque(maxlen=MAX_SAMPLES))
                series.append(Sample(beat.ts, camera.defect_ratio, camera.defect_frames, camera.frames_inferred))
                while series and series[0].ts < beat.ts - SERIES_S:
                    series.popleft()

    def latest(self, machine: str) -> Heartbeat | None:
        with self._lock:
            return self.heartbeats.get(machine)

    def series(self, machine: str, camera: str) -> list[Sample]:
        with self._lock:
            return list(self._series.get((machine, camera), ()))

    def alarms_per_minute(self, machine: str, camera: str) -> float | None:
        """Alarmed frames per minute over the series (None until two samples; a restarted agent's
        counters start again, so the rate is taken from the last restart on)."""
        samples = self.series(machine, camera)
        start = max((i for i in range(1, len(samples)) if samples[i].defect_frames < samples[i - 1].defect_frames),
                    default=0)
        samples = samples[start:]
        if len(samples) < 2 or samples[-1].ts <= samples[0].ts:
            return None
        return (samples[-1].defect_frames - samples[0].defect_frames) / (samples[-1].ts - samples[0].ts) * 60
