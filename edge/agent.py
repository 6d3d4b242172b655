"""The edge agent of one vision machine: cameras, inference, sensors, heartbeats, commands, MQTT.

Threads: one ``capture:<machine>/<camera>`` per camera, ``infer:<machine>`` (micro-batches the
latest frames of all cameras that share a model into one ONNX Runtime call; a ``native`` package
makes one call per frame size among them, each frame at its own size), ``sensors:<machine>``
(one batched LSTM step per tick for all sensor groups) and ``heartbeat:<machine>``. Shutdown is
ordered: cameras stop, in-flight work finishes and is published, then the MQTT connection closes
with a retained ``offline`` status (the last-will does the same if the process dies).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from models.package.anomaly import AnomalyScore, StreamingAnomalyModel
from edge.capture import Camera, CapturedFrame, make_source
from edge.gate import ChangeGate
from edge.grouping import ResultGrouper
from models.package.session import ModelLoadError, SegmentationModel
from edge.metrics import EdgeMetrics, RecentRate
from edge.ota import (LOCAL_ROLLBACK_BATCHES, DownloadError, ModelRecord, ModelSwapper, ShadowRun, SwapOutcome,
                      fetch_package)
from edge.outbox import Forwarder, Outbox, Priority
from models.package.postprocess import image_alarm, mask_from_probabilities, regions_from_probabilities
from edge.load_shedding import LoadShedder
from edge.sensors import ChannelBatch, MqttSensorFeed, SensorSource, make_sensor_source
from edge.settings import (EdgeSite, ModelRef, OutboxConfig, machine_config, metrics_for, outbox_path,
                           resolve_model_path)
from models.package import PackageError, default_cache_dir, load_package, trusted_keys
from stream.messages import (AlarmSpan, Alert, Anomaly, CameraStatus, Command, EncodedMask, Envelope, Event,
                             FrameResult, Heartbeat, MessageError, ModelHealth, ModelOutput, Result, parse_message)
from stream.mqtt import MqttClient, Will
from stream.settings import ConfigError, mqtt_settings
from stream.topics import machine_commands_filter, status_topic, topic_for

log = logging.getLogger(__name__)

LATENCY_WINDOW = 200
RECENT_FRAMES = 8
"""Latest inferred frames kept for a new model's self-test before a swap."""
MODEL_COMMANDS = ("load_model", "rollback_model", "shadow_model", "promote_shadow", "stop_shadow")
RECENT_TICKS = 4096
"""Capture times of a sensor group's latest steps kept to stamp the start of an alarm event (the
runtime may open an event a few steps back); an older start is stamped with the oldest kept."""


@dataclass
class CameraCounters:
    frames_inferred: int = 0
    results_published: int = 0
    defect_frames: int = 0
    defects_last: int = 0
    defect_ratio_last: float = 0.0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    inferred_rate: RecentRate = field(default_factory=RecentRate)
    snapshot_requested: bool = False
    masks_refused: int = 0
    """Masks dropped from a result that would have been over the message size limit with them."""


@dataclass
class SensorCounters:
    steps: int = 0
    anomalies: int = 0
    score_last: float = 0.0
    threshold: float = 0.0
    invalid_scores: int = 0
    """Scores that could not become a valid Anomaly message (not published)."""
    recent_ts: np.ndarray = field(default_factory=lambda: np.zeros(RECENT_TICKS))
    """Capture time of step ``seq`` at ``seq % RECENT_TICKS``."""

    def ts_of(self, seq: int) -> float:
        """Capture time of one of the latest ``RECENT_TICKS`` steps (older: the oldest kept)."""
        return float(self.recent_ts[max(seq, self.steps - RECENT_TICKS) % RECENT_TICKS])


class EdgeAgent:
    """Everything that runs on one machine, built from the site config."""

    def __init__(self, config: EdgeSite, machine_id: str, base_dir: Path = Path("."),
                 heartbeat_s: float = 5.0, client: MqttClient | None = None) -> None:
        self.site = config.site
        self.machine = machine_config(config, machine_id)
        self.id = machine_id
        self.heartbeat_s = heartbeat_s
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._frame_ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self.base_dir = base_dir
        self.packages = config.packages
        self.downloads = default_cache_dir() / "downloads" / machine_id
        trusted = trusted_keys(config.signatures, base_dir)
        self.seg_models = self._load_seg_models(config, base_dir, trusted)
        self.swapper = ModelSwapper(self.seg_models, trusted,
                                    providers={n: r.providers for n, r in config.models.items()},
                                    threads={n: r.threads for n, r in config.models.items()},
                                    downloads=self.downloads, limits=config.packages)
        self.recent_frames: deque[np.ndarray] = deque(maxlen=RECENT_FRAMES)
        self.shadows: dict[str, ShadowRun] = {}
        self.model_records: dict[tuple[str, str], ModelRecord] = {}
        """(model name, package id) -> its health since first loaded; kept for the previous package
        too, so that a rollback goes on with the figures it had."""
        self.anomaly_models = self._load_anomaly_models(config, base_dir, trusted)
        self.cameras = [Camera(machine_id, cam, make_source(cam, base_dir), self._frame_ready)
                        for cam in self.machine.cameras]
        self.camera_counters = {cam.id: CameraCounters() for cam in self.cameras}
        self.gates = {cam.id: ChangeGate(cam.config.gate_threshold) for cam in self.cameras}
        self._last_outputs: dict[str, list[ModelOutput]] = {}
        self.inference = config.inference
        self.grouper = ResultGrouper(config.inference.result_window_ms / 1000.0)
        self.max_message_bytes = config.messages.max_bytes
        self.shedder = LoadShedder({cam.id: cam.config.priority for cam in self.cameras},
                                   high=config.inference.overload_high, low=config.inference.overload_low)
        self.sensor_sources: dict[str, SensorSource] = {
            s.id: make_sensor_source(s, base_dir) for s in self.machine.sensors if s.model
        }
        self.sensor_counters = {group: SensorCounters() for group in self.sensor_sources}
        self.channel_batches = {
            name: ChannelBatch([s for s in self.machine.sensors if s.model == name], model.channels)
            for name, model in self.anomaly_models.items()
        }
        """Per anomaly model: its groups' samples in its channel order, valid ranges, missing counts."""
        self._unrated = {name: {s.id: s.rate_hz for s in self.machine.sensors if s.model == name}
                         for name in self.anomaly_models}
        self.mqtt = client or MqttClient(
            mqtt_settings(config.broker, machine_id, base_dir), client_id=f"edge-{self.site}-{machine_id}",
            will=Will(status_topic(self.site, machine_id), b"offline"),
        )
        self.publish_failures = 0
        self.outbox = self._open_outbox(config.outbox, base_dir)
        self.forwarder = Forwarder(self.outbox, self.mqtt, machine_id)
        self.metrics_config, self.metrics_port_path = metrics_for(config, machine_id)
        self.metrics = EdgeMetrics(self)
        self.metrics_port: int | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, connect_timeout_s: float = 10.0) -> None:
        """Start everything; a broker that is not up within ``connect_timeout_s`` is not fatal, a
        metrics port that cannot be bound is (:class:`ConfigError`, before anything has started)."""
        if self.metrics_config.enabled:
            self.metrics_port = self._serve_metrics()
        self.mqtt.subscribe(machine_commands_filter(self.site, self.id), self._on_command)
        for source in self.sensor_sources.values():
            if isinstance(source, MqttSensorFeed):
                self.mqtt.subscribe(source.topic, source.on_message)
        self.mqtt.on_connected(lambda: self.mqtt.publish(status_topic(self.site, self.id), b"online", retain=True))
        self.mqtt.start()
        try:
            self.mqtt.wait_connected(connect_timeout_s)
        except ConnectionError as exc:  # the outbox holds results until the broker is back
            log.warning("edge:%s: %s; starting anyway, results wait in the outbox", self.id, exc)
        self.forwarder.start()  # first replays what an earlier run left in the outbox
        for camera in self.cameras:
            camera.start()
        self._spawn(f"infer:{self.id}", self._inference_loop)
        if self.sensor_sources:
            self._spawn(f"sensors:{self.id}", self._sensor_loop)
        self._spawn(f"heartbeat:{self.id}", self._heartbeat_loop)
        log.info("edge:%s: started %d cameras, %d sensor groups", self.id, len(self.cameras), len(self.sensor_sources))

    def stop(self) -> None:
        """Ordered: stop intake, let in-flight work publish, then disconnect with status offline."""
        for camera in self.cameras:
            camera.stop()
        self._stop.set()
        self._frame_ready.set()
        for thread in self._threads:
            thread.join(10.0)
        self._threads.clear()
        self._publish(self._heartbeat())
        self.forwarder.stop(drain_s=5.0)  # what is not acknowledged by then stays in the outbox
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

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

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

    # ------------------------------------------------------------ inference

    def _inference_loop(self) -> None:
        while not self._stop.is_set():
            if self._frame_ready.wait(0.2):
                self._stop.wait(self.inference.batch_wait_ms / 1000.0)  # let the other cameras' frames join
                self._frame_ready.clear()
                started = time.perf_counter()
                self.infer_once()
                self._apply_overload_policy(time.perf_counter() - started)
            self._publish_groups(self.grouper.due(time.monotonic()))
        self.infer_once()  # drain what the cameras captured before they stopped
        self._publish_groups(self.grouper.drain())

    def _apply_overload_policy(self, busy_s: float) -> None:
        change = self.shedder.report(time.monotonic(), busy_s)
        camera, name = (change.shed, "overload_shed") if change.shed else (change.restored, "overload_restored")
        if camera is None:
            return
        text = (f"inference busy {change.duty:.0%} of the time: camera {camera} "
                f"{'now infers one frame in ' + str(self.shedder.stride) if change.shed else 'back to every frame'}")
        log.warning("edge:%s: %s", self.id, text)
        self._publish(Event(site=self.site, machine=self.id, ts=time.time(), camera=camera, name=name,
                            level="warning" if change.shed else "info", text=text,
                            details={"duty": round(change.duty, 3)}))

    def infer_once(self) -> int:
        """Run every model once over the latest frames of the cameras that use it; publish results."""
        frames = [(camera, frame) for camera in self.cameras if (frame := camera.take_latest()) is not None]
        outputs: dict[tuple[str, int], list[ModelOutput]] = {}
        frames = [(camera, frame) for camera, frame in frames if self._not_shed(camera)]
        fresh = [(camera, frame) for camera, frame in frames if self._needs_inference(camera, frame)]
        self.recent_frames.extend(frame.image for _, frame in fresh)
        failed: set[tuple[str, int]] = set()
        for name, model in list(self.seg_models.items()):
            batch = [(camera, frame) for camera, frame in fresh if name in camera.config.models]
            for start in range(0, len(batch), self.inference.max_batch):
                part = batch[start : start + self.inference.max_batch]
                if not self._run_batch(name, model, part, outputs):
                    failed |= {(camera.id, frame.seq) for camera, frame in part}
        for camera, frame in frames:
            if not camera.config.models:
                continue
            key = (camera.id, frame.seq)
            if key in outputs:  # what the models that ran gave, even if another one failed
                self._last_outputs[camera.id] = outputs[key]
                self._publish_result(camera, frame, outputs[key])
            elif key not in failed:  # gated: the last result stands for this frame
                reused = [o.model_copy(update={"reused": True, "latency_ms": 0.0, "mask": None})
                          for o in self._last_outputs[camera.id]]
                self._publish_result(camera, frame, reused)
        return len(frames)

    def _not_shed(self, camera: Camera) -> bool:
        """False for the frames the overload policy skips on a shed camera (counted as dropped)."""
        if self.shedder.should_infer(camera.id):
            return True
        camera.count_dropped(1)
        return False

    def _needs_inference(self, camera: Camera, frame: CapturedFrame) -> bool:
        """False when the change gate lets the camera's last result stand for this frame."""
        if camera.id not in self._last_outputs or self.camera_counters[camera.id].snapshot_requested:
            return True
        return self.gates[camera.id].should_infer(frame.image, frame.ts)

    def model_record(self, name: str, model: SegmentationModel) -> ModelRecord:
        """The health record of ``model`` as ``name``: a fresh one for a newly swapped-in package."""
        key = (name, model.package_id)
        if key not in self.model_records:
            previous = self.swapper.previous.get(name)
            kept = {model.package_id, previous.package_id if previous is not None else ""}
            self.model_records = {k: r for k, r in self.model_records.items() if k[0] != name or k[1] in kept}
            self.model_records[key] = ModelRecord(model.package_id)
        return self.model_records[key]

    def _model_health(self, name: str, model: SegmentationModel) -> ModelHealth:
        """Read-only (heartbeat thread): the inference thread alone creates and updates records."""
        record = self.model_records.get((name, model.package_id))
        return record.health() if record is not None else ModelHealth(package=model.package_id)

    def _run_batch(self, name: str, model: SegmentationModel, batch: list[tuple[Camera, CapturedFrame]],
                   outputs: dict[tuple[str, int], list[ModelOutput]]) -> bool:
        """Infer one micro-batch into ``outputs``; False when the model raised (no outputs)."""
        record = self.model_record(name, model)
        started = time.perf_counter()
        images = [frame.image for _, frame in batch]
        try:
            probabilities = model.infer(images)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors derive from Exception only
            record.failed(len(batch))
            self.metrics.inference_errors.labels(self.id, name).inc(len(batch))
            log.warning("edge:%s: %s (%s) failed on %d frames: %s", self.id, name, record.package, len(batch), exc)
            if record.failing_batches >= LOCAL_ROLLBACK_BATCHES and name in self.swapper.previous:
                self._roll_back_locally(name, record, exc)
            return False
        seconds = time.perf_counter() - started
        self._shadow_compare(name, images, probabilities, seconds, model.postprocess.threshold)
        self.metrics.observe_batch(self.id, model.name, seconds, len(batch))
        latency_ms = seconds * 1000.0
        ratios = []
        for (camera, frame), prob in zip(batch, probabilities):
            regions, ratio = regions_from_probabilities(prob, model.postprocess.threshold, model.postprocess.min_area)
            ratios.append(ratio)
            alarm = image_alarm(prob, model.postprocess, regions)
            counters = self.camera_counters[camera.id]
            mask = None
            if counters.snapshot_requested:
                mask = EncodedMask.encode(mask_from_probabilities(prob, model.postprocess.threshold))
                counters.snapshot_requested = False
            outputs.setdefault((camera.id, frame.seq), []).append(ModelOutput(
                model=model.name, version=model.version, latency_ms=latency_ms,
                defect_ratio=ratio, regions=regions, alarm=alarm, mask=mask,
            ))
        record.succeeded(ratios)
        return True

    def _shadow_compare(self, name: str, images: list[np.ndarray], probabilities: list[np.ndarray], seconds: float,
                        threshold: float) -> None:
        """Run the shadow of ``name`` on this batch (1 in N); a shadow that raises is dropped and reported."""
        shadow = self.shadows.get(name)
        if shadow is None:
            return
        try:
            shadow.maybe_compare(images, probabilities, seconds, threshold)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors derive from Exception only
            self.shadows.pop(name, None)
            text = f"{name}: shadow {shadow.model.package_id} failed and was stopped: {exc}"[:2000]
            log.error("edge:%s: %s", self.id, text)
            self._publish(Event(site=self.site, machine=self.id, ts=time.time(), name="shadow_failed", level="error",
                                text=text, details={"model": name, "package": shadow.model.package_id}))

    def _roll_back_locally(self, name: str, record: ModelRecord, exc: Exception) -> None:
        """A swapped-in package that keeps failing goes back to the one before, without waiting for central."""
        outcome = self.swapper.rollback(name)
        text = (f"{name}: {record.package} failed {record.failing_batches} batches in a row ({exc}); "
                f"{outcome.text}")[:2000]
        log.error("edge:%s: %s", self.id, text)
        self._publish(Event(site=self.site, machine=self.id, ts=time.time(), name="model_rolled_back",
                            level="error", text=text,
                            details={**outcome.details, "reason": "local_failure", "failed": record.package,
                                     "errors": record.errors}))

    def _publish_result(self, camera: Camera, frame: CapturedFrame, outputs: list[ModelOutput]) -> None:
        counters = self.camera_counters[camera.id]
        if not any(o.reused for o in outputs):
            counters.frames_inferred += 1
            counters.inferred_rate.add()
            counters.defect_frames += any(o.alarm for o in outputs)
            counters.latencies_ms.append(max(o.latency_ms for o in outputs))
        counters.defects_last = sum(len(o.regions) for o in outputs)
        counters.defect_ratio_last = max(o.defect_ratio for o in outputs)
        frame_result = FrameResult(seq=frame.seq, ts=frame.ts, outputs=outputs, gated=all(o.reused for o in outputs))
        for group in self.grouper.add(camera.id, frame_result, time.monotonic()):
            self._publish_group(camera.id, group)

    def _publish_groups(self, groups: dict[str, list[FrameResult]]) -> None:
        for camera, frames in groups.items():
            self._publish_group(camera, frames)

    def _publish_group(self, camera: str, frames: list[FrameResult]) -> None:
        """One result message for a camera's frames of one window."""
        result = self._within_size(Result(site=self.site, machine=self.id, ts=frames[0].ts, camera=camera,
                                          frames=frames))
        if self._publish(result):
            self.camera_counters[camera].results_published += len(frames)

    def _within_size(self, result: Result) -> Result:
        """The result, or without its masks when they would take it over the message size limit
        (receivers refuse such a message; the refusal is counted per camera)."""
        masks = sum(o.mask is not None for f in result.frames for o in f.outputs)
        if not masks or len(result.to_json()) <= self.max_message_bytes:
            return result
        self.camera_counters[result.camera].masks_refused += masks
        log.warning("edge:%s: dropped %d mask(s) of %s: the result would be over the %d byte message limit",
                    self.id, masks, result.camera, self.max_message_bytes)
        frames = [f.model_copy(update={"outputs": [o.model_copy(update={"mask": None}) for o in f.outputs]})
                  for f in result.frames]
        return result.model_copy(update={"frames": frames})

    # ------------------------------------------------------------ sensors

    def _sensor_loop(self) -> None:
        period = 1.0 / max(source.rate_hz for source in self.sensor_sources.values())
        next_due = time.monotonic()
        while not self._stop.is_set():
            self.sensor_tick()
            next_due += period
            self._stop.wait(max(0.0, next_due - time.monotonic()))

    def sensor_tick(self) -> None:
        """Read one sample per sensor group and score all groups of a model in one batched step."""
        ts = time.time()
        by_model: dict[str, dict[str, np.ndarray]] = {}
        for group in self.machine.sensors:
            source = self.sensor_sources.get(group.id)
            sample = source.next_sample() if source else None
            if sample is not None and group.model:
                by_model.setdefault(group.model, {})[group.id] = sample
        for name, samples in by_model.items():
            model = self.anomaly_models[name]
            scores = model.step(self.channel_batches[name].map(samples), self._new_rates(name, samples))
            for group, score in scores.items():
                self._publish_anomaly(model, group, score, ts)

    def _new_rates(self, model: str, samples: dict[str, np.ndarray]) -> dict[str, float] | None:
        """The sample rates of the groups stepping for the first time (the runtime keeps them)."""
        unrated = self._unrated[model]
        if not unrated:
            return None
        return {group: unrated.pop(group) for group in samples if group in unrated} or None

    def _publish_anomaly(self, model: StreamingAnomalyModel, group: str, score: AnomalyScore, ts: float) -> None:
        counters = self.sensor_counters[group]
        seq = counters.steps
        counters.recent_ts[seq % RECENT_TICKS] = ts
        counters.steps += 1
        counters.score_last = score.score
        counters.threshold = score.threshold
        counters.anomalies += int(score.is_anomaly)
        try:
            message = Anomaly(
                site=self.site, machine=self.id, ts=ts, group=group, seq=seq,
                model=model.name, version=model.version, score=score.score, threshold=score.threshold,
                is_anomaly=score.is_anomaly, channel_scores=score.channel_scores,
                top_channels=list(score.top_channels), alarm=self._alarm_span(counters, seq, score),
            )
        except ValidationError as exc:  # e.g. a zero threshold calibrated on a flat signal: skip, count, go on
            counters.invalid_scores += 1
            if counters.invalid_scores == 1:
                log.warning("edge:%s: %s: a score of model %s is not a valid anomaly message, not published "
                            "(counted in edgeline_edge_sensor_invalid_scores_total): %s", self.id, group, model.name,
                            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]))
            return
        self._publish(message)

    @staticmethod
    def _alarm_span(counters: SensorCounters, seq: int, score: AnomalyScore) -> AlarmSpan | None:
        """The runtime's event in message terms: its steps become this group's seqs, stamped with their capture
        times (``score.step`` is ``seq``'s step in the runtime, which counts the group's steps too)."""
        event = score.event
        if event is None:
            return None
        start = seq - (score.step - event.start)
        end = None if event.end is None else seq - (score.step - event.end)
        return AlarmSpan(start_seq=max(start, 0), start_ts=counters.ts_of(max(start, 0)), end_seq=end,
                         end_ts=None if end is None else counters.ts_of(end), peak_level=event.peak,
                         channels=list(event.channels))

    # ------------------------------------------------------------ heartbeats and commands

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._publish(self._heartbeat())

    def _heartbeat(self) -> Heartbeat:
        process = psutil.Process()
        return Heartbeat(
            site=self.site, machine=self.id, ts=time.time(), uptime_s=time.monotonic() - self.started_at,
            cameras=[self.camera_status(camera) for camera in self.cameras],
            cpu_percent=process.cpu_percent(), rss_mb=process.memory_info().rss / 2**20,
            outbox_depth=self.outbox.depth, outbox_dropped=self.outbox.dropped_total,
            outbox_oldest_age_s=self.outbox.oldest_age_s(),
            models={name: model.package_id for name, model in self.seg_models.items()},
            shadow={name: run.status() for name, run in self.shadows.items()},
            health={name: self._model_health(name, model) for name, model in self.seg_models.items()},
        )

    def camera_status(self, camera: Camera) -> CameraStatus:
        counters = self.camera_counters[camera.id]
        latencies = np.asarray(counters.latencies_ms or [0.0])
        return CameraStatus(
            camera=camera.id, state=camera.state, fps=camera.fps, inferred_fps=counters.inferred_rate.per_second(),
            latency_p50_ms=float(np.percentile(latencies, 50)), latency_p95_ms=float(np.percentile(latencies, 95)),
            latency_p99_ms=float(np.percentile(latencies, 99)),
            queue_depth=camera.queue_depth(), frames_dropped=camera.frames_dropped,
            frames_gated=self.gates[camera.id].gated, shed=camera.id in self.shedder.shed,
            models=[f"{m.name}:{m.version}" for n, m in self.seg_models.items() if n in camera.config.models],
        )

    def _on_command(self, message: paho.MQTTMessage) -> None:
        try:
            command = parse_message(message.payload)
        except MessageError as exc:
            log.warning("edge:%s: bad command on %s: %s", self.id, message.topic, exc.reason)
            return
        if not isinstance(command, Command) or command.machine != self.id:
            log.warning("edge:%s: ignored a message for %s on the command topic", self.id, command.machine)
            return
        if command.name in MODEL_COMMANDS:  # loading takes a while: not on the MQTT thread
            threading.Thread(target=self.apply_model_command, args=(command,), name=f"ota:{self.id}",
                             daemon=True).start()
            return
        applied, text = self.apply_command(command)
        self._publish(Event(site=self.site, machine=self.id, ts=time.time(), camera=command.camera,
                            name="command_applied" if applied else "command_rejected",
                            level="info" if applied else "warning", text=text,
                            details={"command": command.name, "command_id": command.msg_id}))

    def apply_model_command(self, command: Command) -> None:
        """``load_model`` {model, path} swaps a model live; ``rollback_model`` {model} puts the
        previous one back. The outcome is published as an event, with the self-test's figures."""
        model = str(command.args.get("model", ""))
        if command.name in ("shadow_model", "promote_shadow", "stop_shadow"):
            outcome, name = self._shadow_command(command, model)
        elif command.name == "load_model":
            try:
                path = self._package_for(command)
            except DownloadError as exc:
                outcome = SwapOutcome(False, f"{model}: {exc}", {"model": model})
            else:
                outcome = self.swapper.load(model, path, list(self.recent_frames))
            name = "model_loaded" if outcome.ok else "model_load_failed"
        else:
            outcome = self.swapper.rollback(model)
            name = "model_rolled_back" if outcome.ok else "model_rollback_failed"
        log.log(logging.INFO if outcome.ok else logging.WARNING, "edge:%s: %s", self.id, outcome.text)
        self._publish(Event(site=self.site, machine=self.id, ts=time.time(), name=name,
                            level="info" if outcome.ok else "error", text=outcome.text[:2000],
                            details={**outcome.details, "command_id": command.msg_id}))

    def _shadow_command(self, command: Command, model: str) -> tuple[SwapOutcome, str]:
        """``shadow_model`` {model, url+sha256 | path, every}: run a candidate beside the current model
        on every ``every``-th batch; ``promote_shadow`` puts it in place; ``stop_shadow`` drops it."""
        if command.name == "shadow_model":
            try:
                candidate = self.swapper.candidate(model, self._package_for(command))
            except (DownloadError, PackageError, ModelLoadError, OSError) as exc:
                return SwapOutcome(False, f"{model}: shadow refused: {exc}", {"model": model}), "shadow_failed"
            every = max(1, int(command.args.get("every", 5)))
            self.shadows[model] = ShadowRun(candidate, every)
            return SwapOutcome(True, f"{model}: shadowing {candidate.package_id} on 1 batch in {every}",
                               {"model": model, "package": candidate.package_id}), "shadow_started"
        shadow = self.shadows.pop(model, None)
        if shadow is None:
            return SwapOutcome(False, f"{model}: no shadow running", {"model": model}), "shadow_failed"
        if command.name == "stop_shadow":
            return SwapOutcome(True, f"{model}: shadow {shadow.model.package_id} stopped",
                               {"model": model, **shadow.status().model_dump()}), "shadow_stopped"
        outcome = self.swapper.adopt(model, shadow.model)
        return SwapOutcome(True, outcome.text, {**outcome.details, **shadow.status().model_dump()}), "model_loaded"

    def _package_for(self, command: Command) -> Path:
        """``url`` + ``sha256`` (from central; http(s) under ``packages.download_urls`` only): downloaded and
        verified; else ``path`` on this box."""
        if "url" in command.args:
            return fetch_package(str(command.args["url"]), str(command.args.get("sha256", "")), self.downloads,
                                 self.packages)
        return resolve_model_path(ModelRef(path=str(command.args.get("path", ""))), self.base_dir)

    def apply_command(self, command: Command) -> tuple[bool, str]:
        cameras = [c for c in self.cameras if command.camera in (None, c.id)]
        if not cameras:
            return False, f"no camera {command.camera!r} on {self.id}"
        if command.name == "snapshot":
            for camera in cameras:
                self.camera_counters[camera.id].snapshot_requested = True
            return True, f"mask snapshot requested on {', '.join(c.id for c in cameras)}"
        if command.name == "set_fps":
            try:
                fps = float(command.args.get("fps", 0))
                for camera in cameras:
                    camera.set_fps(fps)
            except (TypeError, ValueError) as exc:
                return False, f"set_fps: {exc}"
            return True, f"fps set to {fps:g} on {', '.join(c.id for c in cameras)}"
        if command.name == "set_gate":
            try:
                threshold = float(command.args.get("threshold", -1))
                for camera in cameras:
                    self.gates[camera.id].set_threshold(threshold)
            except (TypeError, ValueError) as exc:
                return False, f"set_gate: {exc}"
            return True, f"gate threshold set to {threshold:g} on {', '.join(c.id for c in cameras)}"
        return False, f"unknown command {command.name!r}"

    def _publish(self, message: Envelope) -> bool:
        """Heartbeats go straight out (only the latest matters); everything else through the
        outbox. False when the message could not be stored or sent."""
        if isinstance(message, Heartbeat):
            info = self.mqtt.publish(topic_for(message), message.to_json(), qos=1)
            if info.rc != 0:
                self.publish_failures += 1
            return info.rc == 0
        if self.outbox.put(topic_for(message), message.to_json(), priority_of(message)) is None:
            return False
        self.forwarder.notify()
        return True


def priority_of(message: Envelope) -> Priority:
    """Outbox rank: sampled masks go first when full, then results; alerts and anomalies last."""
    if isinstance(message, Result):
        return Priority.MASK if any(o.mask for f in message.frames for o in f.outputs) else Priority.RESULT
    if isinstance(message, Anomaly):
        return Priority.ANOMALY
    if isinstance(message, Alert):
        return Priority.ALERT
    return Priority.EVENT
