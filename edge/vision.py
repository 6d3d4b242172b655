"""The vision pipeline of one machine: capture -> gate -> batch -> infer -> results.

One :class:`~edge.capture.Camera` per camera (its own supervised capture loop) feeds a bounded
latest-frame queue; the ``infer`` loop micro-batches the latest frames of all cameras that share
a model into one ONNX Runtime call (a ``native`` package makes one call per frame size among
them, each frame at its own size), skips frames the change gate finds unchanged (the last result
stands for them) and those the overload policy sheds, and hands grouped results to a publisher.
Shutdown is ordered: the cameras stop, then the loop infers what they captured and publishes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.capture import Camera, CapturedFrame, FrameSource
from edge.evidence import Candidate, EvidenceService
from edge.gate import ChangeGate
from edge.grouping import ResultGrouper
from edge.load_shedding import LoadShedder
from edge.metrics import EdgeMetrics, RecentRate
from edge.ota import LOCAL_ROLLBACK_BATCHES, ModelRecord, ModelSwapper, ShadowRun
from edge.publisher import Publisher
from edge.settings import CameraConfig, InferenceConfig
from models.package.postprocess import image_alarm, mask_from_probabilities, regions_from_probabilities
from models.package.session import SegmentationModel
from stream.messages import (CameraStatus, EncodedMask, Event, Evidence, FrameResult, ModelHealth, ModelOutput,
                             Result, ShadowStatus, stable_msg_id)
from stream.service import Service, Supervisor

log = logging.getLogger(__name__)

LATENCY_WINDOW = 200
RECENT_FRAMES = 8
"""Latest inferred frames kept for a new model's self-test before a swap."""


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


class VisionPipeline(Service):
    """The cameras of one machine and the loop that infers their frames and publishes the results."""

    def __init__(self, site: str, machine: str, cameras: Sequence[CameraConfig],
                 source_for: Callable[[CameraConfig], FrameSource], swapper: ModelSwapper,
                 inference: InferenceConfig, max_message_bytes: int, publisher: Publisher, metrics: EdgeMetrics,
                 supervisor: Supervisor | None = None, evidence: EvidenceService | None = None) -> None:
        super().__init__(f"vision:{machine}", supervisor=supervisor)
        self.site = site
        self.id = machine
        self.publisher = publisher
        self.metrics = metrics
        self.swapper = swapper
        self.seg_models = swapper.models
        """Model name -> the running model; a swap replaces an entry, read once per batch."""
        self.frame_ready = threading.Event()
        self.cameras = [Camera(machine, cam, source_for(cam), self.frame_ready) for cam in cameras]
        for camera in self.cameras:
            self.add_child(camera)
        self.camera_counters = {cam.id: CameraCounters() for cam in self.cameras}
        self.gates = {cam.id: ChangeGate(cam.config.gate_threshold) for cam in self.cameras}
        self.recent_frames: deque[np.ndarray] = deque(maxlen=RECENT_FRAMES)
        self.shadows: dict[str, ShadowRun] = {}
        self.model_records: dict[tuple[str, str], ModelRecord] = {}
        """(model name, package id) -> its health since first loaded; kept for the previous package
        too, so that a rollback goes on with the figures it had."""
        self._last_outputs: dict[str, list[ModelOutput]] = {}
        self.evidence = evidence
        self._evidence_waiting: dict[str, list[Candidate]] = {cam.id: [] for cam in self.cameras}
        """Per camera, evidence whose frame's result message is not published yet (it gives the msg_id)."""
        self.inference = inference
        self.grouper = ResultGrouper(inference.result_window_ms / 1000.0)
        self.max_message_bytes = max_message_bytes
        self.shedder = LoadShedder({cam.id: cam.config.priority for cam in self.cameras},
                                   high=inference.overload_high, low=inference.overload_low)
        self.add_loop("infer", self._inference_loop)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Intake first: the cameras stop, then the loop infers and publishes what they captured."""
        for camera in self.cameras:
            camera.stop(timeout_s)
        self.stopping.set()
        self.frame_ready.set()
        super().stop(timeout_s)

    # ------------------------------------------------------------ inference

    def _inference_loop(self) -> None:
        while not self.stopping.is_set():
            if self.frame_ready.wait(0.2):
                self.stopping.wait(self.inference.batch_wait_ms / 1000.0)  # let the other cameras' frames join
                self.frame_ready.clear()
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
        self.publisher.publish(Event(site=self.site, machine=self.id, ts=time.time(), camera=camera, name=name,
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
            snapshot, counters.snapshot_requested = counters.snapshot_requested, False
            mask = EncodedMask.encode(mask_from_probabilities(prob, model.postprocess.threshold)) if snapshot else None
            output = ModelOutput(model=model.name, version=model.version, latency_ms=latency_ms, defect_ratio=ratio,
                                 regions=regions, alarm=alarm, mask=mask)
            outputs.setdefault((camera.id, frame.seq), []).append(output)
            if snapshot or alarm:
                self._keep_evidence(camera, frame, output, prob, model.postprocess.threshold, snapshot)
        record.succeeded(ratios)
        return True

    def _keep_evidence(self, camera: Camera, frame: CapturedFrame, output: ModelOutput, prob: np.ndarray,
                       threshold: float, snapshot: bool) -> None:
        """Hold the frame as evidence when :class:`~edge.evidence.EvidenceRate` says so, until
        its result message is published."""
        if self.evidence is None:
            return
        reason = self.evidence.rate.keep(camera.id, output.model, output.alarm, snapshot, frame.ts)
        if reason is None:
            return
        height, width = frame.image.shape[:2]
        evidence = Evidence(msg_id=stable_msg_id("evidence", self.site, self.id, camera.id, output.model, frame.seq,
                                                 frame.ts),
                            site=self.site, machine=self.id, ts=frame.ts, camera=camera.id, seq=frame.seq,
                            model=output.model, version=output.version, reason=reason,
                            defect_ratio=output.defect_ratio, regions=list(output.regions), width=width, height=height)
        self._evidence_waiting[camera.id].append(Candidate(evidence, frame.image.copy(),
                                                           mask_from_probabilities(prob, threshold)))

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
            self.publisher.publish(Event(site=self.site, machine=self.id, ts=time.time(), name="shadow_failed",
                                         level="error", text=text,
                                         details={"model": name, "package": shadow.model.package_id}))

    def _roll_back_locally(self, name: str, record: ModelRecord, exc: Exception) -> None:
        """A swapped-in package that keeps failing goes back to the one before, without waiting for central."""
        outcome = self.swapper.rollback(name)
        text = (f"{name}: {record.package} failed {record.failing_batches} batches in a row ({exc}); "
                f"{outcome.text}")[:2000]
        log.error("edge:%s: %s", self.id, text)
        self.publisher.publish(Event(site=self.site, machine=self.id, ts=time.time(), name="model_rolled_back",
                                     level="error", text=text,
                                     details={**outcome.details, "reason": "local_failure", "failed": record.package,
                                              "errors": record.errors}))

    # ------------------------------------------------------------ results

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
        if self.publisher.publish(result):
            self.camera_counters[camera].results_published += len(frames)
        self._hand_over_evidence(camera, {frame.seq for frame in frames}, result.msg_id)

    def _hand_over_evidence(self, camera: str, seqs: set[int], result_msg_id: str) -> None:
        """The waiting evidence of these frames, now that their result message has its msg_id."""
        waiting = self._evidence_waiting.get(camera)
        if self.evidence is None or not waiting:
            return
        self._evidence_waiting[camera] = [c for c in waiting if c.evidence.seq not in seqs]
        for candidate in waiting:
            if candidate.evidence.seq in seqs:
                candidate.evidence.result_msg_id = result_msg_id
                self.evidence.submit(candidate)

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

    # ------------------------------------------------------------ status

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
            frames_inferred=counters.frames_inferred, defect_frames=counters.defect_frames,
            defect_ratio=counters.defect_ratio_last,
        )

    def models_running(self) -> dict[str, str]:
        """Model name -> package id running (what rollouts watch)."""
        return {name: model.package_id for name, model in self.seg_models.items()}

    def shadow_status(self) -> dict[str, ShadowStatus]:
        return {name: run.status() for name, run in self.shadows.items()}

    def model_health(self) -> dict[str, ModelHealth]:
        """Read-only (heartbeat thread): the inference loop alone creates and updates records."""
        health = {}
        for name, model in self.seg_models.items():
            record = self.model_records.get((name, model.package_id))
            health[name] = record.health() if record is not None else ModelHealth(package=model.package_id)
        return health


class VisionCollector(Collector):
    """Reads the vision pipeline's own counters at scrape time."""

    def __init__(self, vision: VisionPipeline) -> None:
        self.vision = vision

    def collect(self) -> Iterator[Metric]:
        vision, machine = self.vision, self.vision.id
        per_camera = {
            "frames_captured": CounterMetricFamily("edgeline_edge_frames_captured", "Frames read from the camera",
                                                   labels=["machine", "camera"]),
            "frames_dropped": CounterMetricFamily("edgeline_edge_frames_dropped",
                                                  "Frames dropped by the full camera queue (oldest first)",
                                                  labels=["machine", "camera"]),
            "frames_inferred": CounterMetricFamily("edgeline_edge_frames_inferred", "Frames run through the models",
                                                   labels=["machine", "camera"]),
            "frames_gated": CounterMetricFamily("edgeline_edge_frames_gated",
                                                "Frames the change gate answered with the last result",
                                                labels=["machine", "camera"]),
            "results": CounterMetricFamily("edgeline_edge_results", "Frame results handed to the outbox (a grouped message holds several)",
                                           labels=["machine", "camera"]),
            "masks_refused": CounterMetricFamily("edgeline_edge_masks_refused", "Masks dropped from a result "
                                                 "because they would take it over the message size limit",
                                                 labels=["machine", "camera", "reason"]),
            "defects": CounterMetricFamily("edgeline_edge_defect_frames",
                                           "Inferred frames on which a model's image-level alarm fired",
                                           labels=["machine", "camera"]),
            "up": GaugeMetricFamily("edgeline_edge_camera_up", "1 while the camera delivers frames, else 0",
                                    labels=["machine", "camera"]),
            "shed": GaugeMetricFamily("edgeline_edge_camera_shed",
                                      "1 while the overload policy infers only one frame in a few",
                                      labels=["machine", "camera"]),
            "queue": GaugeMetricFamily("edgeline_edge_camera_queue_frames", "Frames waiting in the camera queue",
                                       labels=["machine", "camera"]),
        }
        for camera in vision.cameras:
            counters, labels = vision.camera_counters[camera.id], [machine, camera.id]
            per_camera["frames_captured"].add_metric(labels, camera.frames_captured)
            per_camera["frames_dropped"].add_metric(labels, camera.frames_dropped)
            per_camera["frames_inferred"].add_metric(labels, counters.frames_inferred)
            per_camera["frames_gated"].add_metric(labels, vision.gates[camera.id].gated)
            per_camera["results"].add_metric(labels, counters.results_published)
            per_camera["masks_refused"].add_metric([*labels, "size"], counters.masks_refused)
            per_camera["defects"].add_metric(labels, counters.defect_frames)
            per_camera["up"].add_metric(labels, 1.0 if camera.state == "ok" else 0.0)
            per_camera["queue"].add_metric(labels, camera.queue_depth())
            per_camera["shed"].add_metric(labels, 1.0 if camera.id in vision.shedder.shed else 0.0)
        yield from per_camera.values()
