"""The demo's live terminal view (rich): cameras, sensors, alerts, counts."""

from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from edgeline.demo import Demo

SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}


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


class DemoView:
    def __init__(self, demo: Demo, duration_s: float | None) -> None:
        self.demo = demo
        self.duration_s = duration_s
        self.captured = RateMeter()
        self.inferred = RateMeter()

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

    def _cameras(self) -> Table:
        table = Table(title="Cameras", expand=True)
        for column in ("machine", "camera", "model", "state", "fps", "inferred/s", "p50 ms", "p99 ms",
                       "drops", "defects", "defect %"):
            table.add_column(column, justify="right" if column not in ("machine", "camera", "model", "state") else "left")
        for agent in self.demo.agents:
            for camera in agent.cameras:
                key = f"{agent.id}/{camera.id}"
                counters = agent.camera_counters[camera.id]
                status = agent.camera_status(camera)
                has_model = bool(camera.config.models)
                table.add_row(
                    agent.id, camera.id, ",".join(camera.config.models) or "—", camera.state,
                    f"{self.captured.update(key, camera.frames_captured):.1f}",
                    f"{self.inferred.update(key, counters.frames_inferred):.1f}" if has_model else "—",
                    f"{status.latency_p50_ms:.1f}" if has_model else "—",
                    f"{status.latency_p99_ms:.1f}" if has_model else "—",
                    str(camera.frames_dropped),
                    str(counters.defects_last) if has_model else "—",
                    f"{100 * counters.defect_ratio_last:.2f}" if has_model else "—",
                )
        return table

    def _sensors(self) -> Table:
        table = Table(title="Pump sensors (streaming LSTM)", expand=True)
        for column in ("machine", "group", "steps", "score", "threshold", "anomalous steps"):
            table.add_column(column)
        for agent in self.demo.agents:
            for group, counters in agent.sensor_counters.items():
                hot = counters.threshold and counters.score_last >= counters.threshold
                score = f"[bold red]{counters.score_last:.2f}[/]" if hot else f"{counters.score_last:.2f}"
                table.add_row(agent.id, group, str(counters.steps), score, f"{counters.threshold:.2f}",
                              str(counters.anomalies))
        return table

    def _alerts(self) -> Table:
        table = Table(title="Latest alerts", expand=True)
        for column in ("time", "severity", "rule", "key", "state", "value"):
            table.add_column(column)
        with self.demo.monitor.lock:
            alerts = list(self.demo.monitor.recent_alerts)
        for alert in alerts:
            style = SEVERITY_STYLE[alert.severity] if alert.state == "firing" else "green"
            table.add_row(time.strftime("%H:%M:%S", time.localtime(alert.ts)), alert.severity, alert.rule,
                          alert.key, alert.state, f"{alert.value:.3g}", style=style)
        return table
