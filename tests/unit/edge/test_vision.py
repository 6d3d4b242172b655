"""The vision pipeline without a broker: real cameras (scripted sources), a real ONNX Runtime model,
results into an in-memory publisher."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.capture import CapturedFrame
from edge.metrics import EdgeMetrics
from edge.ota import ModelSwapper
from edge.publisher import MemoryPublisher
from edge.settings import CameraConfig, InferenceConfig
from edge.vision import VisionCollector, VisionPipeline
from models.package import BUILTIN_PACKAGES, load_package
from models.package.session import SegmentationModel
from models.package.signing import builtin_trusted_keys
from models.package.synthetic import SyntheticCamera
from stream.messages import Event, Result
from stream.service import Supervisor

SIZE = (96, 72)


@pytest.fixture(scope="module")
def seg() -> SegmentationModel:
    return SegmentationModel(load_package(BUILTIN_PACKAGES / "seg-synth-int8", trusted_keys=builtin_trusted_keys()))


class ConveyorSource:
    """The synthetic conveyor, one new frame per read; ``fail_at``: the read that raises a RuntimeError
    (a fault, not a :class:`~edge.capture.SourceError` the camera retries on its own)."""

    def __init__(self, seed: int = 0, fail_at: int | None = None) -> None:
        self.camera = SyntheticCamera(seed=seed, width=SIZE[0], height=SIZE[1], defect_rate=0.5)
        self.reads = 0
        self.opens = 0
        self.fail_at = fail_at

    def open(self) -> None:
        self.opens += 1

    def read(self) -> np.ndarray:
        self.reads += 1
        if self.reads == self.fail_at:
            raise RuntimeError("scripted: the driver returned garbage")
        return self.camera.frame(self.reads).image

    def close(self) -> None:
        pass


def pipeline(seg: SegmentationModel, publisher: MemoryPublisher, cameras: list[dict], tmp_path: Path,
             sources: dict[str, ConveyorSource] | None = None, supervisor: Supervisor | None = None,
             max_message_bytes: int = 1 << 20, **inference) -> VisionPipeline:
    configs = [CameraConfig.model_validate({"fps": 50, "resolution": SIZE, "models": ["seg"], **c}) for c in cameras]
    sources = sources or {}
    swapper = ModelSwapper({"seg": seg}, builtin_trusted_keys(), providers={}, threads={}, downloads=tmp_path)
    return VisionPipeline("s1", "m1", configs, lambda cam: sources.get(cam.id) or ConveyorSource(), swapper,
                          InferenceConfig(**inference), max_message_bytes, publisher, EdgeMetrics(), supervisor)


def offer(vision: VisionPipeline, camera: int, seq: int, image: np.ndarray) -> None:
    """A frame in a camera's queue, as its capture loop would put it."""
    vision.cameras[camera]._put(CapturedFrame(vision.cameras[camera].id, seq, time.time(), image))


def frame(i: int) -> np.ndarray:
    return SyntheticCamera(seed=1, width=SIZE[0], height=SIZE[1], defect_rate=0.5).frame(i).image


def test_one_batch_for_the_cameras_of_a_model_and_one_result_each(seg: SegmentationModel, tmp_path: Path) -> None:
    publisher = MemoryPublisher()
    vision = pipeline(seg, publisher, [{"id": "c1"}, {"id": "c2"}, {"id": "c3", "models": []}], tmp_path)
    for i in range(3):
        offer(vision, i, 0, frame(i))
    assert vision.infer_once() == 3
    results = publisher.of(Result)
    assert sorted(r.camera for r in results) == ["c1", "c2"]  # no model, no result
    assert all(len(r.frames) == 1 and r.frames[0].outputs[0].model == "seg-synth" for r in results)
    registry = vision.metrics.registry
    labels = {"machine": "m1", "model": "seg-synth"}
    assert registry.get_sample_value("edgeline_edge_inference_batch_frames_count", labels) == 1
    assert registry.get_sample_value("edgeline_edge_inference_batch_frames_sum", labels) == 2
    assert vision.camera_counters["c1"].frames_inferred == 1 and vision.camera_counters["c1"].results_published == 1
    assert vision.model_health()["seg"].frames == 2


def test_an_unchanged_frame_reuses_the_last_result(seg: SegmentationModel, tmp_path: Path) -> None:
    publisher = MemoryPublisher()
    vision = pipeline(seg, publisher, [{"id": "c1", "gate_threshold": 5}], tmp_path)
    image = frame(3)
    for seq in range(3):  # the first result, then the gate's reference frame, then a repeat
        offer(vision, 0, seq, image.copy())
        vision.infer_once()
    first, reference, repeat = publisher.of(Result)
    assert not first.frames[0].outputs[0].reused and not reference.frames[0].gated
    assert repeat.frames[0].gated and repeat.frames[0].outputs[0].reused and repeat.frames[0].outputs[0].latency_ms == 0
    assert repeat.frames[0].outputs[0].regions == reference.frames[0].outputs[0].regions
    assert vision.gates["c1"].gated == 1 and vision.camera_counters["c1"].frames_inferred == 2


def test_a_snapshot_over_the_size_limit_goes_out_without_its_mask(seg: SegmentationModel, tmp_path: Path) -> None:
    publisher = MemoryPublisher()
    vision = pipeline(seg, publisher, [{"id": "c1"}], tmp_path, max_message_bytes=600)
    vision.camera_counters["c1"].snapshot_requested = True
    offer(vision, 0, 0, frame(5))
    vision.infer_once()
    (result,) = publisher.of(Result)
    assert result.frames[0].outputs[0].mask is None and vision.camera_counters["c1"].masks_refused == 1
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in VisionCollector(vision).collect() for s in family.samples}
    assert samples[("edgeline_edge_masks_refused_total", (("camera", "c1"), ("machine", "m1"), ("reason", "size")))] == 1


def test_a_refused_publish_is_not_counted_as_published(seg: SegmentationModel, tmp_path: Path) -> None:
    vision = pipeline(seg, MemoryPublisher(accept=False), [{"id": "c1"}], tmp_path)
    offer(vision, 0, 0, frame(1))
    vision.infer_once()
    assert vision.camera_counters["c1"].frames_inferred == 1 and vision.camera_counters["c1"].results_published == 0


def test_a_shadow_that_raises_is_stopped_and_reported(seg: SegmentationModel, tmp_path: Path) -> None:
    from edge.ota import ShadowRun

    class Broken:
        package_id = "seg-broken"

        def infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("scripted: no session")

    publisher = MemoryPublisher()
    vision = pipeline(seg, publisher, [{"id": "c1"}], tmp_path)
    vision.shadows["seg"] = ShadowRun(Broken(), every=1)  # type: ignore[arg-type]
    offer(vision, 0, 0, frame(1))
    vision.infer_once()
    (event,) = publisher.of(Event)
    assert event.name == "shadow_failed" and "seg-broken" in event.text and vision.shadows == {}
    assert len(publisher.of(Result)) == 1  # the running model's result still goes out


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.01)


@pytest.fixture
def started() -> Iterator[list[VisionPipeline]]:
    running: list[VisionPipeline] = []
    yield running
    for vision in running:
        vision.stop()


def test_stop_publishes_every_frame_the_loop_inferred(seg: SegmentationModel, tmp_path: Path,
                                                      started: list[VisionPipeline]) -> None:
    """A long result window holds every result back: only the ordered stop (cameras, then the loop's
    drain) publishes them, all of them."""
    publisher = MemoryPublisher()
    vision = pipeline(seg, publisher, [{"id": "c1", "fps": 20}], tmp_path, result_window_ms=60_000)
    started.append(vision)
    vision.start()
    assert any(t.name == "vision:m1/infer" for t in threading.enumerate())
    assert any(t.name == "capture:m1/c1" for t in threading.enumerate())
    wait_until(lambda: vision.camera_counters["c1"].frames_inferred >= 3, what="3 frames inferred")
    assert publisher.of(Result) == []
    vision.stop()
    assert vision.cameras[0].state == "stopped"
    frames = [f for r in publisher.of(Result) for f in r.frames]
    assert len(frames) == vision.camera_counters["c1"].results_published == vision.camera_counters["c1"].frames_inferred
    assert [f.seq for f in frames] == sorted(f.seq for f in frames)


def test_a_camera_whose_source_raises_is_restarted_by_the_supervisor(seg: SegmentationModel, tmp_path: Path,
                                                                     started: list[VisionPipeline]) -> None:
    supervisor = Supervisor("edge", registry=EdgeMetrics().registry, backoff_first_s=0.01,
                            on_give_up=lambda service, exc: pytest.fail(f"gave up on {service}: {exc}"))
    source = ConveyorSource(fail_at=3)
    publisher = MemoryPublisher()
    vision = pipeline(seg, publisher, [{"id": "c1", "fps": 50}], tmp_path, sources={"c1": source},
                      supervisor=supervisor)
    started.append(vision)
    vision.start()
    wait_until(lambda: source.reads > 6 and vision.camera_counters["c1"].frames_inferred >= 2,
               what="frames after the fault")
    assert source.opens == 2  # reopened by the restarted loop
    assert supervisor.restarts() == {"capture:m1/c1": 1, "vision:m1/infer": 0}
