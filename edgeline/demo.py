"""``edgeline demo``: a simulated factory on one box, end to end over a real MQTT broker.

One process tree: an MQTT broker (Mosquitto when installed, else an embedded Python broker),
N simulated machines running the ONNX models on synthetic cameras and pump sensors, the
embedded rules engine, central with the operator console (a child process, when the ``central``
extra is installed: it keeps the alerts and the agents' evidence), and a monitor that reads
everything back from MQTT for the live view and the closing summary. :class:`Demo` is a
:class:`stream.service.Service`: the broker and the monitor come up in its ``on_start``, then its
children, central, the rules runner and the edge fleet; they stop in reverse (the agents first,
then the rules once the site is quiet, then central), the broker last.
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import yaml

from edge.agent import EdgeAgent
from edge.sensors import SyntheticSensorGroup
from edgeline.config import SiteConfig, from_dict
from edgeline.services import free_port, port_open, start_mqtt_broker
from stream.embedded import EmbeddedRulesRunner
from stream.messages import Alert, Anomaly, Command, MessageError, Result, parse_message
from stream.mqtt import MqttClient, MqttSettings
from stream.service import Service
from stream.settings import mqtt_settings
from stream.topics import site_filter

log = logging.getLogger(__name__)

DEMO_RULES = [
    {"name": "surface-defect", "description": "defects on consecutive frames", "kind": "k_of_n",
     "metric": "defect_count", "condition": {"op": ">=", "value": 1}, "k": 2, "n": 4, "window_s": 5,
     "clear_after_s": 3, "scope": "camera", "severity": "warning",
     "actions": [{"type": "alert"}, {"type": "command", "name": "snapshot"}]},
    {"name": "large-defect", "description": "a defect covering over 1% of the frame", "kind": "threshold",
     "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.01}, "clear_after_s": 2,
     "scope": "camera", "severity": "critical"},
    {"name": "pump-anomaly", "description": "pump sensors off their forecast", "kind": "k_of_n",
     "metric": "anomaly_level", "condition": {"op": ">=", "value": 1.0}, "k": 2, "n": 3, "window_s": 5,
     "clear_after_s": 3, "scope": "machine", "severity": "critical"},
]


def demo_config(machines: int = 3, seed: int = 0, fps: float = 5.0) -> SiteConfig:
    """Machines with 2, 3, 4, 2, … cameras and one pump each; the first camera of m01 has no model."""
    layout = []
    for index in range(machines):
        cameras = [
            {"id": f"cam{c + 1}", "models": [] if (index, c) == (0, 0) else ["seg"],
             "source": {"type": "synthetic", "seed": seed * 1000 + index * 10 + c, "defect_rate": 0.3}}
            for c in range(2 + index % 3)
        ]
        sensors = [{"id": "pump1", "model": "anomaly", "rate_hz": 20.0,
                    "source": {"type": "synthetic", "seed": seed * 1000 + index, "anomaly_rate": 0.1}}]
        layout.append({"id": f"m{index + 1:02d}", "line": f"line-{index // 2 + 1}", "cameras": cameras,
                       "sensors": sensors})
    return from_dict({
        "site": "demo",
        "camera_defaults": {"fps": fps, "resolution": [320, 240]},
        "models": {"seg": {"path": "builtin:seg-synth-int8"}, "anomaly": {"path": "builtin:anomaly-skab", "profile": "fast-start"}},
        "machines": layout,
        "rules": DEMO_RULES,
        "engine": {"allowed_lateness_s": 2.0},
        "metrics": {"enabled": False},
    }, source="<demo>")


@dataclass
class SiteMonitor:
    """Everything seen on the site's MQTT topics, counted for the live view and the summary."""

    results: int = 0
    frames: int = 0
    anomaly_steps: int = 0
    anomalies: int = 0
    alarm_events: dict[tuple[str, str, int], int | None] = field(default_factory=dict)
    """(machine, group, first seq) of each alarm event seen -> its end seq (None while open)."""
    alerts_firing: int = 0
    alerts_resolved: int = 0
    commands: int = 0
    invalid: int = 0
    recent_alerts: deque[Alert] = field(default_factory=lambda: deque(maxlen=8))
    last_anomaly: dict[tuple[str, str], Anomaly] = field(default_factory=dict)
    last_result: dict[tuple[str, str], Result] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, message: paho.MQTTMessage) -> None:
        if message.topic.endswith(("/status", "/_deadletter")):
            return
        try:
            envelope = parse_message(message.payload)
        except MessageError:
            self.invalid += 1
            return
        with self.lock:
            self._count(envelope)

    def _count(self, envelope: object) -> None:
        if isinstance(envelope, Result):
            self.results += 1
            self.frames += len(envelope.frames)
            self.last_result[(envelope.machine, envelope.camera)] = envelope
        elif isinstance(envelope, Anomaly):
            self.anomaly_steps += 1
            self.anomalies += int(envelope.is_anomaly)
            self.last_anomaly[(envelope.machine, envelope.group)] = envelope
            if envelope.alarm is not None:
                self.alarm_events[(envelope.machine, envelope.group, envelope.alarm.start_seq)] = envelope.alarm.end_seq
        elif isinstance(envelope, Alert):
            self.recent_alerts.appendleft(envelope)
            if envelope.state == "firing":
                self.alerts_firing += 1
            else:
                self.alerts_resolved += 1
        elif isinstance(envelope, Command):
            self.commands += 1


@dataclass(frozen=True)
class PumpTally:
    """Faults the simulated pumps injected after their calibration, against the alarm events the agents raised."""

    injected: int = 0
    detected: int = 0
    events: int = 0
    false_events: int = 0

    def __add__(self, other: PumpTally) -> PumpTally:
        return PumpTally(self.injected + other.injected, self.detected + other.detected, self.events + other.events,
                         self.false_events + other.false_events)


def tally_pump(faults: list[tuple[int, int]], events: list[tuple[int, int | None]], calibration: int,
               tolerance: int) -> PumpTally:
    """A fault (first, end) counts when it starts after the calibration; it is detected when an alarm event
    (first, end or None) overlaps it or the ``tolerance`` samples after it. An event that overlaps no fault
    so widened (calibration-time faults included) is false."""
    widened = [(first, end + tolerance) for first, end in faults]
    counted = [w for w, (first, _) in zip(widened, faults) if first >= calibration]
    spans = [(first, end if end is not None else first + 1) for first, end in events]

    def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] < b[1] and b[0] < a[1]

    detected = sum(any(overlaps(f, e) for e in spans) for f in counted)
    false_events = sum(not any(overlaps(e, f) for f in widened) for e in spans)
    return PumpTally(len(counted), detected, len(spans), false_events)


@dataclass
class DemoSummary:
    machines: int
    cameras: int
    duration_s: float
    frames_captured: int
    frames_inferred: int
    results: int
    anomaly_steps: int
    anomalies: int
    pump_faults: PumpTally
    alerts_firing: int
    alerts_resolved: int
    commands: int
    dead_lettered: int

    def lines(self) -> list[str]:
        return [
            f"machines {self.machines}, cameras {self.cameras}, ran {self.duration_s:.1f} s",
            f"frames captured {self.frames_captured}, inferred {self.frames_inferred}",
            f"results {self.results}",
            f"anomaly scores {self.anomaly_steps}, anomalous scores {self.anomalies}",
            f"pump faults injected {self.pump_faults.injected}, detected {self.pump_faults.detected}; "
            f"alarm events {self.pump_faults.events}, false {self.pump_faults.false_events}",
            f"alerts {self.alerts_firing} firing, {self.alerts_resolved} resolved; commands {self.commands}",
            f"dead-lettered {self.dead_lettered}",
        ]


class EdgeFleet(Service):
    """The demo's edge agents as one part; once they stopped, ``on_stop`` waits until the site's
    topics are quiet, so that the rules runner stopped after it has seen what they published."""

    def __init__(self, agents: list[EdgeAgent], wait_quiet: Callable[[], None]) -> None:
        super().__init__("demo:edge")
        self.wait_quiet = wait_quiet
        for agent in agents:
            self.add_child(agent)

    def on_stop(self) -> None:
        self.wait_quiet()


CENTRAL_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "jinja2")


def central_installed() -> bool:
    """Whether the ``central`` extra is here (the demo runs without it, and without a console)."""
    return all(importlib.util.find_spec(name) is not None for name in CENTRAL_MODULES)


class CentralProcess(Service):
    """``edgeline central serve`` for the demo's site as a child process on ``port`` (its output in
    ``folder/central.log``): it keeps the alerts and evidence and serves the operator console."""

    def __init__(self, config: SiteConfig, folder: Path, port: int, token: str) -> None:
        super().__init__("demo:central")
        self.folder, self.port, self.token = folder, port, token
        self.url = f"http://127.0.0.1:{port}"
        self.site_file = folder / "site.yaml"
        self.site_file.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True)))
        (folder / "token").write_text(token + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def on_start(self, timeout_s: float = 60.0) -> None:
        with (self.folder / "central.log").open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeline.cli", "central", "serve", "-c", str(self.site_file),
                 "--token-file", str(self.folder / "token"), "--db", f"sqlite:///{self.folder / 'central.db'}",
                 "--storage", str(self.folder / "packages"), "--evidence-dir", str(self.folder / "evidence"),
                 "--port", str(self.port), "--log-level", "warning"], stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.on_stop()
                log_text = (self.folder / "central.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"central did not come up on port {self.port}: {log_text}")
            time.sleep(0.3)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/console/login", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def on_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Demo(Service):
    """Starts and stops the demo's parts in order; the CLI drives it for a duration."""

    def __init__(self, config: SiteConfig, base_dir: Path = Path("."), prefer_mosquitto: bool = True,
                 console_port: int | None = 0) -> None:
        """``console_port``: where central serves the console (0: a free port; None: no central)."""
        super().__init__(f"demo:{config.site}")
        self.config = config
        self.console_port = console_port
        self.central: CentralProcess | None = None
        self.base_dir = base_dir
        self.prefer_mosquitto = prefer_mosquitto
        self.monitor = SiteMonitor()
        self.broker = None
        self.agents: list[EdgeAgent] = []
        self.runner: EmbeddedRulesRunner | None = None
        self.monitor_client: MqttClient | None = None
        self.started = 0.0
        self.ran_s = 0.0
        self._outbox_dir = tempfile.TemporaryDirectory(prefix="edgeline-demo-outbox-")  # a demo keeps nothing

    def on_start(self) -> None:
        """The broker and the monitor; then the runner and the agents, made now that the broker's
        port is known, become the children (a demo starts once)."""
        try:
            settings = self._start_broker_and_monitor()
            self.central = self._central()
            self.runner = EmbeddedRulesRunner(
                self.config.site, self.config.rules, MqttClient(settings, client_id="demo-rules"),
                lines=self.config.lines(), allowed_lateness_s=self.config.engine.allowed_lateness_s,
                dedupe_ttl_s=self.config.engine.dedupe_ttl_s, dedupe_max_entries=self.config.engine.dedupe_max_entries,
                max_states=self.config.engine.max_rule_states, limits=self.config.messages,
            )
            self.agents = [EdgeAgent(self.config, machine.id, self.base_dir) for machine in self.config.machines]
        except BaseException:
            self.on_stop()
            raise
        if self.central is not None:
            self.add_child(self.central)
        self.add_child(self.runner)
        self.add_child(EdgeFleet(self.agents, self._wait_quiet))

    def start(self) -> None:
        super().start()
        self.started = time.monotonic()

    def _start_broker_and_monitor(self) -> MqttSettings:
        self.broker = start_mqtt_broker(prefer_mosquitto=self.prefer_mosquitto)
        broker = self.config.broker.model_copy(update={"host": self.broker.host, "port": self.broker.port})
        outbox = self.config.outbox.model_copy(update={"path": f"{self._outbox_dir.name}/{{machine}}.sqlite"})
        evidence = self.config.evidence.model_copy(update={"path": f"{self._outbox_dir.name}/evidence-{{machine}}"})
        metrics = self.config.metrics.model_copy(update={"port": 0})  # several agents in one process
        machines = [m.model_copy(update={"metrics_port": None}) for m in self.config.machines]
        self.config = self.config.model_copy(update={"broker": broker, "outbox": outbox, "evidence": evidence,
                                                     "metrics": metrics, "machines": machines})
        settings = mqtt_settings(broker)
        self.monitor_client = MqttClient(settings, client_id="demo-monitor")
        self.monitor_client.subscribe(site_filter(self.config.site), self.monitor.on_message)
        self.monitor_client.start()
        self.monitor_client.wait_connected()
        return settings

    def _central(self) -> CentralProcess | None:
        """Central for the console, with the agents' evidence delivered to it (per-machine tokens)."""
        if self.console_port is None or not central_installed():
            return None
        from central.tokens import MachineTokens

        folder = Path(self._outbox_dir.name)
        token = secrets.token_urlsafe(18)
        port = self.console_port
        if port and port_open("127.0.0.1", port):
            log.warning("demo: port %d is taken; the console goes on a free port", port)
            port = 0
        central = CentralProcess(self.config, folder, port or free_port(), token)
        for machine in self.config.machines:
            (folder / f"{machine.id}.evidence-token").write_text(MachineTokens(token).token(machine.id))
        evidence = self.config.evidence.model_copy(update={
            "central_url": central.url, "token_file": str(folder / "{machine}.evidence-token")})
        self.config = self.config.model_copy(update={"evidence": evidence})
        return central

    def stop(self, timeout_s: float = 10.0) -> None:
        """Edge first (publishing what is in flight), then let the rules catch up, then the broker."""
        if self.started and not self.ran_s:
            self.ran_s = time.monotonic() - self.started
        super().stop(timeout_s)

    def on_stop(self) -> None:
        """After the children (the fleet, then the rules runner): the monitor, then the broker."""
        if self.monitor_client is not None:
            self.monitor_client.stop()
        if self.broker is not None:
            self.broker.stop()
        self._outbox_dir.cleanup()

    def _wait_quiet(self, quiet_s: float = 0.5, limit_s: float = 5.0) -> None:
        deadline = time.monotonic() + limit_s
        last = -1
        while time.monotonic() < deadline:
            seen = self.monitor_client.stats.received if self.monitor_client else 0
            if seen == last:
                return
            last = seen
            time.sleep(quiet_s)

    def _pump_faults(self, tolerance_s: float = 2.0) -> PumpTally:
        """Injected pump faults against alarm events, over every synthetic sensor group (monitor lock held)."""
        total = PumpTally()
        for agent in self.agents:
            for group in agent.machine.sensors:
                source = agent.sensing.sensor_sources.get(group.id)
                if not isinstance(source, SyntheticSensorGroup) or group.model is None:
                    continue
                events = [(first, end) for (machine, name, first), end in self.monitor.alarm_events.items()
                          if (machine, name) == (agent.id, group.id)]
                calibration = agent.sensing.anomaly_models[group.model].calibration.steps
                total += tally_pump(source.injected(), events, calibration, round(tolerance_s * group.rate_hz))
        return total

    def summary(self) -> DemoSummary:
        with self.monitor.lock:
            m = self.monitor
            return DemoSummary(
                machines=len(self.agents), cameras=sum(len(a.vision.cameras) for a in self.agents),
                duration_s=self.ran_s or time.monotonic() - self.started,
                frames_captured=sum(c.frames_captured for a in self.agents for c in a.vision.cameras),
                frames_inferred=sum(c.frames_inferred for a in self.agents for c in a.vision.camera_counters.values()),
                results=m.results, anomaly_steps=m.anomaly_steps, anomalies=m.anomalies,
                pump_faults=self._pump_faults(),
                alerts_firing=m.alerts_firing, alerts_resolved=m.alerts_resolved, commands=m.commands,
                dead_lettered=self.runner.metrics.count("dead_lettered") if self.runner else 0,
            )
