"""The edge agent of one vision machine: a supervisor of its pipelines, over one MQTT connection.

``EdgeAgent`` is a :class:`~stream.service.Service` (``edge:<machine>``) whose loops run under a
:class:`~stream.service.Supervisor` ("edge": a crashed loop is logged, counted in
``edgeline_edge_restarts_total{service}``, restarted with backoff, and reported in heartbeats).
Its children, started in this order and stopped in reverse:

- heartbeats (:mod:`edge.heartbeat`): every ``heartbeat_s``, and a last one on stop;
- the outbox forwarder (:class:`edge.outbox.Forwarder`): first replays what an earlier run left;
- evidence (:mod:`edge.evidence`): alarmed frames encoded, stored and delivered to central;
- vision (:mod:`edge.vision`): cameras -> change gate -> micro-batches -> ONNX Runtime -> results;
- sensing (:mod:`edge.sensing`): one batched LSTM step per tick for all sensor groups;
- OTA (:mod:`edge.model_commands`): model loads, shadows and rollbacks, off the MQTT thread;
- commands (:mod:`edge.commands`): the machine's command topic, handlers found by name.

So shutdown is ordered: commands and OTA stop, cameras stop, in-flight frames are inferred and
published, the outbox drains for up to 5 s, the last heartbeat goes out, then the MQTT connection
closes with a retained ``offline`` status (the last-will does the same if the process dies).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.capture import make_source
from edge.commands import CommandRegistry, CommandsPipeline, camera_commands
from edge.evidence import EvidenceCollector, EvidenceService
from edge.heartbeat import HeartbeatPipeline
from edge.metrics import EdgeMetrics
from edge.model_commands import OtaPipeline, model_commands
from edge.ota import ModelSwapper
from edge.outbox import Forwarder, Outbox
from edge.publisher import OutboxPublisher, TransportCollector
from edge.sensing import SensingCollector, SensingPipeline
from edge.sensors import make_sensor_source
from edge.settings import EdgeSite, OutboxConfig, machine_config, metrics_for, outbox_path, resolve_model_path
from edge.vision import VisionCollector, VisionPipeline
from models.package import default_cache_dir, load_package, trusted_keys
from models.package.anomaly import StreamingAnomalyModel
from models.package.session import SegmentationModel
from stream.mqtt import MqttClient, Will
from stream.service import Service, Supervisor
from stream.settings import ConfigError, mqtt_settings
from stream.topics import machine_commands_filter, status_topic

log = logging.getLogger(__name__)

OUTBOX_DRAIN_S = 5.0
"""On stop, how long the outbox may take to empty; what is not acknowledged by then stays in it."""


class EdgeAgent(Service):
    """Everything that runs on one machine, built from the site config."""

    def __init__(self, config: EdgeSite, machine_id: str, base_dir: Path = Path("."),
                 heartbeat_s: float = 5.0, client: MqttClient | None = None) -> None:
        self.metrics = EdgeMetrics()
        super().__init__(f"edge:{machine_id}", supervisor=Supervisor("edge", registry=self.metrics.registry))
        self.site = config.site
        self.machine = machine_config(config, machine_id)
        self.id = machine_id
        self.connect_timeout_s = 10.0
        trusted = trusted_keys(config.signatures, base_dir)
        downloads = default_cache_dir() / "downloads" / machine_id
        swapper = ModelSwapper(self._load_seg_models(config, base_dir, trusted), trusted,
                               providers={n: r.providers for n, r in config.models.items()},
                               threads={n: r.threads for n, r in config.models.items()},
                               downloads=downloads, limits=config.packages)
        anomaly_models = self._load_anomaly_models(config, base_dir, trusted)
        self.mqtt = client or MqttClient(
            mqtt_settings(config.broker, machine_id, base_dir), client_id=f"edge-{self.site}-{machine_id}",
            will=Will(status_topic(self.site, machine_id), b"offline"),
        )
        self.outbox = self._open_outbox(config.outbox, base_dir)
        self.forwarder = Forwarder(self.outbox, self.mqtt, machine_id, drain_s=OUTBOX_DRAIN_S)
        self.publisher = OutboxPublisher(self.outbox, self.forwarder, self.mqtt)
        self.evidence = self._evidence_service(config, base_dir)
        self.vision = VisionPipeline(self.site, machine_id, self.machine.cameras,
                                     lambda camera: make_source(camera, base_dir), swapper, config.inference,
                                     config.messages.max_bytes, self.publisher, self.metrics, self.supervisor,
                                     evidence=self.evidence)
        self.sensing = SensingPipeline(self.site, machine_id, self.machine.sensors, anomaly_models,
                                       {s.id: make_sensor_source(s, base_dir) for s in self.machine.sensors if s.model},
                                       self.publisher, self.supervisor)
        self.heartbeats = HeartbeatPipeline(self.site, machine_id, heartbeat_s, self.vision, self.outbox,
                                            self.supervisor, self.publisher)
        self.ota = OtaPipeline(machine_id, self.publisher)
        self.commands = CommandsPipeline(self.site, machine_id, CommandRegistry(
            [*camera_commands(self.vision), *model_commands(self.vision, config.packages, downloads, base_dir)]),
            self.publisher, self.ota.submit)
        for child in (self.heartbeats, self.forwarder, self.evidence, self.vision, self.sensing, self.ota,
                      self.commands):
            if child is not None:
                self.add_child(child)
        for collector in (VisionCollector(self.vision), SensingCollector(self.sensing),
                          TransportCollector(machine_id, self.publisher)):
            self.metrics.registry.register(collector)
        if self.evidence is not None:
            self.metrics.registry.register(EvidenceCollector(self.evidence))
        self.metrics_config, self.metrics_port_path = metrics_for(config, machine_id)
        self.metrics_port: int | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, connect_timeout_s: float = 10.0) -> None:
        """Start everything; a broker that is not up within ``connect_timeout_s`` is not fatal, a
        metrics port that cannot be bound is (:class:`ConfigError`, before anything has started)."""
        self.connect_timeout_s = connect_timeout_s
        super().start()
        log.info("edge:%s: started %d cameras, %d sensor groups", self.id, len(self.vision.cameras),
                 len(self.sensing.sensor_sources))

    def on_start(self) -> None:
        if self.metrics_config.enabled:
            try:
                self.metrics_port = self._serve_metrics()
            except ConfigError:  # nothing else has started: release the outbox, as stop() would
                self.outbox.close()
                raise
        self.mqtt.subscribe(machine_commands_filter(self.site, self.id), self.commands.on_message)
        for feed in self.sensing.feeds():
            self.mqtt.subscribe(feed.topic, feed.on_message)
        self.mqtt.on_connected(lambda: self.mqtt.publish(status_topic(self.site, self.id), b"online", retain=True))
        self.mqtt.start()
        try:
            self.mqtt.wait_connected(self.connect_timeout_s)
        except ConnectionError as exc:  # the outbox holds results until the broker is back
            log.warning("edge:%s: %s; starting anyway, results wait in the outbox", self.id, exc)

    def on_stop(self) -> None:
        """After the pipelines (the last heartbeat is out, the outbox drained): disconnect with status offline."""
        self.mqtt.stop(final=(status_topic(self.site, self.id), b"offline"))
        self.outbox.close()
        self.metrics.stop()
        log.info("edge:%s: stopped", self.id)

    def _open_outbox(self, config: OutboxConfig, base_dir: Path) -> Outbox:
        path = outbox_path(config, self.id, base_dir)
        try:
            return Outbox(path, config.max_messages)
        except (OSError, sqlite3.Error) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"edge:{self.id}", [f"outbox.path: cannot open {path}: {reason} (a writable folder: "
                                                  "relative paths are relative to the site file)"]) from None

    def _evidence_service(self, config: EdgeSite, base_dir: Path) -> EvidenceService | None:
        """Evidence for machines with cameras, when ``evidence.enabled``."""
        if not (config.evidence.enabled and self.machine.cameras):
            return None
        try:
            return EvidenceService(self.id, config.evidence, base_dir, self.supervisor)
        except ConfigError:  # nothing else has started: release the outbox, as stop() would
            self.outbox.close()
            raise

    def _serve_metrics(self) -> int:
        host, port = self.metrics_config.host, self.metrics_config.port
        try:
            bound = self.metrics.serve(host, port)
        except OSError as exc:
            raise ConfigError(f"edge:{self.id}", [self._metrics_bind_problem(exc)]) from None
        log.info("edge:%s: metrics on http://%s:%d/metrics", self.id, host, bound)
        return bound

    def _metrics_bind_problem(self, exc: OSError) -> str:
        where = f"{self.metrics_port_path}: {self.metrics_config.host}:{self.metrics_config.port}"
        if exc.errno == errno.EADDRINUSE:
            return (f"{where} is already in use (another agent on this box? give each machine its own: "
                    "machines[].metrics_port, or metrics.port: 0)")
        return f"{where}: cannot serve metrics: {exc.strerror or exc}"

    # ------------------------------------------------------------ models

    def _load_seg_models(self, config: EdgeSite, base_dir: Path,
                         trusted: list[Ed25519PublicKey] | None) -> dict[str, SegmentationModel]:
        """The segmentation models this machine's cameras use, each from a verified package."""
        names = {name for camera in self.machine.cameras for name in camera.models}
        return {
            name: SegmentationModel(load_package(resolve_model_path(ref, base_dir), trusted_keys=trusted,
                                                 limits=config.packages), ref.providers, ref.threads)
            for name, ref in config.models.items() if name in names
        }

    def _load_anomaly_models(self, config: EdgeSite, base_dir: Path,
                             trusted: list[Ed25519PublicKey] | None) -> dict[str, StreamingAnomalyModel]:
        """The anomaly models this machine's sensor groups use, each from a verified package."""
        names = {sensor.model for sensor in self.machine.sensors if sensor.model}
        return {
            name: StreamingAnomalyModel(load_package(resolve_model_path(ref, base_dir), trusted_keys=trusted,
                                                     limits=config.packages),
                                        ref.providers, ref.threads, calibration_steps=ref.calibration_steps,
                                        profile=ref.profile)
            for name, ref in config.models.items() if name in names
        }
