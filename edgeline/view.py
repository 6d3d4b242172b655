"""The demo's live terminal view (rich): cameras, sensors, alerts, counts. Piped, its tables come out whole."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from edgeline.demo import Demo
from stream.console import Column, TableOutput

if TYPE_CHECKING:
    from edge.agent import EdgeAgent
    from edge.capture import Camera

SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}
DEFECT_WINDOW_S = 10.0


class RateMeter:
    """Frames per second per camera from successive counter readings."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._rate: dict[str, float] = {}

    def update(self, key: str, count: int) -> float:
        now = time.monotonic()
        then, before = self._last.get(key, (now, count))
        if now - then >= 1.0 or key not in self._last:
            self._rate[key] = (count - before) / (now - then) if now > then else 0.0
            self._last[key] = (now, count)
        return self._rate.get(key, 0.0)


class WindowCount:
    """How much a cumulative counter grew over the last ``window_s`` seconds, from successive readings."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._readings: dict[str, deque[tuple[float, int]]] = {}

    def update(self, key: str, count: int, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        readings = self._readings.setdefault(key, deque())
        readings.append((now, count))
        while len(readings) > 1 and readings[1][0] <= now - self.window_s:
            readings.popleft()  # keep the newest reading at or before the window's start as its base
        return count - readings[0][1]


class DemoView:
    def __init__(self, demo: Demo, duration_s: float | None) -> None:
        self.demo = demo
        self.duration_s = duration_s
        self.captured = RateMeter()
        self.inferred = RateMeter()
        self.defect_frames = WindowCount(DEFECT_WINDOW_S)
        self.inferred_frames = WindowCount(DEFECT_WINDOW_S)

    def render(self) -> Group:
        return Group(self._header(), self._cameras(), self._sensors(), self._alerts())

    def _header(self) -> Panel:
        elapsed = time.monotonic() - self.demo.started
        limit = f" / {self.duration_s:.0f} s" if self.duration_s else " (Ctrl-C to stop)"
        s = self.demo.summary()
        broker = self.demo.broker
        text = (f"site [bold]{self.demo.config.site}[/] · broker {type(broker).__name__} "
                f"{broker.host}:{broker.port} · {elapsed:.0f} s{limit}\n"
                f"frames {s.frames_captured} captured, {s.frames_inferred} inferred · results {s.results} · "
                f"anomaly scores {s.anomaly_steps} ({s.anomalies} anomalous) · alerts {s.alerts_firing} · "
                f"commands {s.commands}")
        return Panel(text, title="Edgeline demo", border_style="blue")

    def _cameras(self) -> TableOutput:
        columns = [Column("camera", key=True), Column("model", key=True), Column("state", key=True),
                   *(Column(name, numeric=True) for name in ("fps", "inferred fps", "p50/p99 ms", "drops",
                                                             f"defect frames in last {DEFECT_WINDOW_S:g} s",
                                                             "last frame defect %"))]
        rows = [self._camera_row(agent, camera) for agent in self.demo.agents for camera in agent.vision.cameras]
        return TableOutput(columns, rows, "Cameras")

    def _camera_row(self, agent: EdgeAgent, camera: Camera) -> list[str]:
        key = f"{agent.id}/{camera.id}"
        counters = agent.vision.camera_counters[camera.id]
        fps = f"{self.captured.update(key, camera.frames_captured):.1f}"
        if not camera.config.models:
            return [key, "—", camera.state, fps, "—", "—", str(camera.frames_dropped), "—", "—"]
        status = agent.vision.camera_status(camera)
        defects = self.defect_frames.update(key, counters.defect_frames)
        inferred = self.inferred_frames.update(key, counters.frames_inferred)
        return [key, ",".join(camera.config.models), camera.state, fps,
                f"{self.inferred.update(key, counters.frames_inferred):.1f}",
                f"{status.latency_p50_ms:.1f}/{status.latency_p99_ms:.1f}", str(camera.frames_dropped),
                f"{defects} of {inferred}", f"{100 * counters.defect_ratio_last:.2f}"]

    def _sensors(self) -> TableOutput:
        rows = []
        for agent in self.demo.agents:
            for group, counters in agent.sensing.sensor_counters.items():
                hot = counters.threshold and counters.score_last >= counters.threshold
                rows.append([agent.id, group, str(counters.steps),
                             Text(f"{counters.score_last:.2f}", style="bold red" if hot else ""),
                             f"{counters.threshold:.2f}", str(counters.anomalies)])
        return TableOutput([Column("machine", key=True), Column("group", key=True),
                            *(Column(name, numeric=True) for name in ("steps", "score", "threshold",
                                                                      "anomalous steps"))],
                           rows, "Pump sensors (streaming LSTM)")

    def _alerts(self) -> TableOutput:
        with self.demo.monitor.lock:
            alerts = list(self.demo.monitor.recent_alerts)
        rows = []
        for alert in alerts:
            style = SEVERITY_STYLE[alert.severity] if alert.state == "firing" else "green"
            rows.append([Text(cell, style=style) for cell in (
                time.strftime("%H:%M:%S", time.localtime(alert.ts)), alert.severity, alert.rule, alert.key,
                alert.state, f"{alert.value:.3g}")])
        return TableOutput(["time", "severity", Column("rule", key=True), Column("key", key=True), "state",
                            Column("value", numeric=True)], rows, "Latest alerts")
